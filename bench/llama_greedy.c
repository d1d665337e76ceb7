/* Greedy decoding in llama.cpp from given token ids, printing each chosen id with its logit margin.

   Built and run by bench/llama_parity.py against a llama.cpp build (shared/peers/llamacpp_peer.sh):
       llama_greedy MODEL.gguf N_PREDICT ID,ID,...
   prints one line per generated token: "id top1_logit top2_id top2_logit". Token ids come from the
   caller's tokenizer, so that both runtimes see the same prompt; the output stops at an end-of-generation
   token. One thread: the numbers do not depend on it, and llama.cpp's spinning threads crawl on a
   loaded machine. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "llama.h"

static void top2(const float *logits, int n_vocab, int *best, int *second) {
    *best = 0;
    *second = 1;
    if (logits[1] > logits[0]) {
        *best = 1;
        *second = 0;
    }
    for (int i = 2; i < n_vocab; i++) {
        if (logits[i] > logits[*best]) {
            *second = *best;
            *best = i;
        } else if (logits[i] > logits[*second]) {
            *second = i;
        }
    }
}

static void quiet(enum ggml_log_level level, const char *text, void *data) {
    (void)level;
    (void)text;
    (void)data;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s MODEL.gguf N_PREDICT ID,ID,...\n", argv[0]);
        return 2;
    }
    int n_predict = atoi(argv[2]);
    int n_prompt = 1;
    for (const char *c = argv[3]; *c; c++) n_prompt += *c == ',';
    llama_token *ids = malloc(sizeof(llama_token) * (size_t)(n_prompt + n_predict));
    char *rest = argv[3];
    for (int i = 0; i < n_prompt; i++) ids[i] = (llama_token)strtol(rest, &rest, 10), rest += *rest == ',';

    llama_log_set(quiet, NULL);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    struct llama_model *model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    const struct llama_vocab *vocab = llama_model_get_vocab(model);
    int n_vocab = llama_vocab_n_tokens(vocab);
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t)(n_prompt + n_predict + 8);
    cp.n_batch = cp.n_ctx;
    cp.n_threads = cp.n_threads_batch = 1;
    cp.no_perf = true;
    struct llama_context *ctx = llama_init_from_model(model, cp);

    struct llama_batch batch = llama_batch_get_one(ids, n_prompt);
    for (int step = 0; step < n_predict; step++) {
        if (llama_decode(ctx, batch) != 0) {
            fprintf(stderr, "llama_decode failed\n");
            return 1;
        }
        const float *logits = llama_get_logits_ith(ctx, -1);
        int best, second;
        top2(logits, n_vocab, &best, &second);
        printf("%d %.6f %d %.6f\n", best, logits[best], second, logits[second]);
        fflush(stdout);
        if (llama_vocab_is_eog(vocab, best)) break;
        ids[n_prompt + step] = best;
        batch = llama_batch_get_one(&ids[n_prompt + step], 1);
    }
    llama_free(ctx);
    llama_model_free(model);
    free(ids);
    return 0;
}
