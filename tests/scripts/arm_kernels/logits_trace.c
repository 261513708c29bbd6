// Greedy decoding with llama.cpp, printing what examples/logits_trace.rs prints for
// sampler-sdk, so the two can be compared line by line (compare_model.sh runs both for
// Arm under qemu):
//   step <i> argmax <token> hash <FNV-1a 64 of every logit's bits> head <first logits>
// Usage: logits_trace MODEL THREADS DECODED TOKEN_ID[,TOKEN_ID...]
// Flash attention is off and the KV cache f16, as llama-cpp-python's defaults are. With
// TRACE_DIR set, every f32 tensor of the graph is also written to TRACE_DIR/<name>.f32 as
// it is computed (later calls overwrite), as SAMPLER_SDK_TRACE_DIR makes sampler-sdk do.

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ggml.h"
#include "llama.h"

static void quiet(enum ggml_log_level level, const char * text, void * user) {
    (void) level;
    (void) text;
    (void) user;
}

static const char * trace_dir;

static bool trace_tensor(struct ggml_tensor * t, bool ask, void * user) {
    (void) user;
    if (ask) return t->type == GGML_TYPE_F32 && ggml_is_contiguous(t);
    char path[4096];
    snprintf(path, sizeof path, "%s/%s.f32", trace_dir, t->name);
    FILE * f = fopen(path, "wb");
    if (f) {
        fwrite(t->data, 1, ggml_nbytes(t), f);
        fclose(f);
    }
    return true;
}

static void report(int step, const float * logits, int n_vocab, llama_token * argmax) {
    uint64_t hash = 0xcbf29ce484222325ull;
    int best = 0;
    for (int i = 0; i < n_vocab; i++) {
        uint32_t bits;
        memcpy(&bits, &logits[i], sizeof bits);
        hash = (hash ^ bits) * 0x100000001b3ull;
        if (logits[i] > logits[best]) best = i;
    }
    printf("step %d argmax %d hash %016" PRIx64 " head %.9g %.9g %.9g %.9g\n", step, best, hash,
           logits[0], logits[1], logits[2], logits[3]);
    fflush(stdout);
    *argmax = best;
}

int main(int argc, char ** argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s MODEL THREADS DECODED TOKEN_ID[,TOKEN_ID...]\n", argv[0]);
        return 2;
    }
    int threads = atoi(argv[2]);
    int decoded = atoi(argv[3]);
    llama_token prompt[512];
    int n_prompt = 0;
    for (char * tok = strtok(argv[4], ","); tok && n_prompt < 512; tok = strtok(NULL, ",")) {
        prompt[n_prompt++] = atoi(tok);
    }

    llama_log_set(quiet, NULL);
    llama_backend_init();
    struct llama_model_params mparams = llama_model_default_params();
    struct llama_model * model = llama_model_load_from_file(argv[1], mparams);
    if (!model) return 1;
    struct llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = 512;
    cparams.n_batch = 512;
    cparams.n_ubatch = 512;
    cparams.n_threads = threads;
    cparams.n_threads_batch = threads;
    cparams.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    trace_dir = getenv("TRACE_DIR");
    if (trace_dir) {
        cparams.cb_eval = trace_tensor;
        cparams.cb_eval_user_data = NULL;
    }
    struct llama_context * ctx = llama_init_from_model(model, cparams);
    if (!ctx) return 1;
    int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));

    llama_token next;
    if (llama_decode(ctx, llama_batch_get_one(prompt, n_prompt))) return 1;
    report(0, llama_get_logits_ith(ctx, -1), n_vocab, &next);
    for (int step = 1; step <= decoded; step++) {
        if (llama_decode(ctx, llama_batch_get_one(&next, 1))) return 1;
        report(step, llama_get_logits_ith(ctx, -1), n_vocab, &next);
    }
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
