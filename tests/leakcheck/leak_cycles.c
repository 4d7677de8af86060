/*
 * leak_cycles.c - load / generate / re-order / free cycles for leak checking.
 *
 * Usage: leak_cycles MODEL.gguf N_CYCLES [patch|baseline]
 *
 * Each cycle in "patch" mode (the default):
 *   1. llama_model_load_from_file with the KV override llama.layer_order = "0-3,1-2"
 *      (all 4 weight layers of the tiny model are loaded, 6 execution positions),
 *   2. create a context, greedily decode a few tokens, save its state (whole and sequence 0, which
 *      carry the layer-order fingerprint) and restore it into the same context, check that
 *      llama_model_set_layer_order fails with -2 while the context is alive, free the context,
 *   3. llama_model_set_layer_order to {3,2,1,0,1} (only loaded layers), check that an invalid order
 *      ({0,7}) is refused with -1, read the order back,
 *   4. create a context again, decode again, check that the state saved in step 2 is refused
 *      (fingerprint mismatch - the error path of the state reader), free it,
 *   5. restore the file's order (n_order == 0), free the model,
 *   6. error paths: a load with an invalid override ("0-9" on a 4-layer model must return NULL) and
 *      llama_layer_order_parse of a malformed spec.
 *
 * Under valgrind memcheck (if <valgrind/memcheck.h> was found at build time) the program runs a leak
 * search after cycle 10 and an "added" leak search after the last cycle, whose summary gives the
 * growth of each kind ("still reachable: X (+Y) bytes").  Heap in use is printed from mallinfo2
 * (run with GLIBC_TUNABLES=glibc.malloc.tcache_count=0: chunks in glibc's tcache count as in use).
 *
 * With LEAK_CYCLES_INJECT_LEAK set, one 4096-byte block per cycle is lost on purpose (self-test of
 * the leak checker); with LEAK_CYCLES_INJECT_LEAK=reachable the blocks are kept reachable instead.
 * LEAK_CYCLES_VERBOSE lets the library log.
 *
 * "baseline" mode does the same load / decode / save state / free / decode / restore state / free
 * work with NO override and NO re-order (and no invalid load; the state restore succeeds), so
 * whatever a leak checker reports in both modes comes from code that runs without a layer order
 * (upstream llama.cpp / ggml, or the patch's always-on paths), and what only "patch" mode shows
 * comes from the layer-order features.
 *
 * The tokens generated in every cycle must be identical (the weights and orders do not change),
 * which is also checked.  Exit status: 0 on success, 1 on any failure.
 */

#define _GNU_SOURCE /* mallinfo2 */
#include "llama.h"

#include <malloc.h>
#if defined(__has_include)
#  if __has_include(<valgrind/memcheck.h>)
#    include <valgrind/memcheck.h>
#    define LEAK_CYCLES_HAVE_VALGRIND 1
#  endif
#endif
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define N_PROMPT 4
#define N_GEN    6
#define MAX_ORDER 64

/* The cycles provoke expected errors (busy re-order, invalid order, invalid load); keep the
 * library quiet unless LEAK_CYCLES_VERBOSE is set - this program reports its own failures. */
static void quiet_log(enum ggml_log_level level, const char * text, void * user_data) {
    (void) level;
    (void) text;
    (void) user_data;
}

static void set_str_override(struct llama_model_kv_override * kv, const char * key, const char * val) {
    memset(kv, 0, sizeof(*kv));
    kv->tag = LLAMA_KV_OVERRIDE_TYPE_STR;
    snprintf(kv->key, sizeof(kv->key), "%s", key);
    snprintf(kv->val_str, sizeof(kv->val_str), "%s", val);
}

static struct llama_model * load_model(const char * path, const char * order_spec) {
    struct llama_model_kv_override kv[2];
    struct llama_model_params mparams = llama_model_default_params();
    mparams.n_gpu_layers = 0;
    if (order_spec) {
        set_str_override(&kv[0], "llama.layer_order", order_spec);
        memset(&kv[1], 0, sizeof(kv[1])); /* terminator: key[0] == 0 */
        mparams.kv_overrides = kv;
    }
    return llama_model_load_from_file(path, mparams);
}

/* A saved context state: the whole state and the state of sequence 0 */
struct saved_state {
    uint8_t * full;
    size_t    full_size;
    uint8_t * seq;
    size_t    seq_size;
};

static void saved_state_free(struct saved_state * st) {
    free(st->full);
    free(st->seq);
    memset(st, 0, sizeof(*st));
}

/* Save the state of ctx into st (both kinds), and check that it restores into ctx itself */
static int save_state(struct llama_context * ctx, struct saved_state * st) {
    st->full_size = llama_state_get_size(ctx);
    st->full      = malloc(st->full_size);
    st->seq_size  = llama_state_seq_get_size(ctx, 0);
    st->seq       = malloc(st->seq_size);
    if (!st->full || !st->seq) {
        return -1;
    }
    st->full_size = llama_state_get_data(ctx, st->full, st->full_size);
    st->seq_size  = llama_state_seq_get_data(ctx, st->seq, st->seq_size, 0);
    if (st->full_size == 0 || st->seq_size == 0) {
        fprintf(stderr, "saving the state failed\n");
        return -1;
    }
    if (llama_state_set_data(ctx, st->full, st->full_size) != st->full_size ||
        llama_state_seq_set_data(ctx, st->seq, st->seq_size, 0) == 0) {
        fprintf(stderr, "restoring the state into its own context failed\n");
        return -1;
    }
    return 0;
}

/* Create a context, greedily decode N_GEN tokens after a fixed prompt, write them to out.
 * If probe_busy, also check that re-ordering is refused (-2) while the context is alive.
 * If save, save the state after decoding (and restore it into the same context).
 * If restore, restore that state after decoding: it must succeed if restore_ok, else fail (0), as
 * a state saved under another layer order does (its fingerprint differs). */
static int generate(struct llama_model * model, llama_token * out, int probe_busy,
                    struct saved_state * save, const struct saved_state * restore, int restore_ok) {
    struct llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx           = 64;
    cparams.n_batch         = 64;
    cparams.n_ubatch        = 64;
    cparams.n_seq_max       = 1;
    cparams.n_threads       = 1;
    cparams.n_threads_batch = 1;

    struct llama_context * ctx = llama_init_from_model(model, cparams);
    if (!ctx) {
        fprintf(stderr, "llama_init_from_model failed\n");
        return -1;
    }

    const struct llama_vocab * vocab = llama_model_get_vocab(model);
    const int32_t n_vocab = llama_vocab_n_tokens(vocab);

    int rc = 0;
    llama_token prompt[N_PROMPT] = { llama_vocab_bos(vocab), 3 + 'a', 3 + 'b', 3 + 'c' };
    struct llama_batch batch = llama_batch_get_one(prompt, N_PROMPT);
    llama_token tok = 0;

    for (int i = 0; i < N_GEN; i++) {
        if (llama_decode(ctx, batch) != 0) {
            fprintf(stderr, "llama_decode failed at step %d\n", i);
            rc = -1;
            break;
        }
        const float * logits = llama_get_logits_ith(ctx, -1);
        if (!logits) {
            fprintf(stderr, "no logits at step %d\n", i);
            rc = -1;
            break;
        }
        int best = 0;
        for (int v = 1; v < n_vocab; v++) {
            if (logits[v] > logits[best]) {
                best = v;
            }
        }
        out[i] = tok = (llama_token) best;
        batch = llama_batch_get_one(&tok, 1);
    }

    if (rc == 0 && save && save_state(ctx, save) != 0) {
        rc = -1;
    }

    if (rc == 0 && restore) {
        const size_t r_full = llama_state_set_data(ctx, restore->full, restore->full_size);
        const size_t r_seq  = llama_state_seq_set_data(ctx, restore->seq, restore->seq_size, 0);
        if (restore_ok ? (r_full != restore->full_size || r_seq == 0) : (r_full != 0 || r_seq != 0)) {
            fprintf(stderr, "restoring a saved state returned %zu (whole) / %zu (seq 0), expected %s\n",
                    r_full, r_seq, restore_ok ? "success" : "0 (layer order mismatch)");
            rc = -1;
        }
    }

    if (rc == 0 && probe_busy) {
        const int32_t busy[2] = { 0, 1 };
        const int32_t r = llama_model_set_layer_order(model, busy, 2);
        if (r != -2) {
            fprintf(stderr, "llama_model_set_layer_order with a live context returned %d, expected -2\n", r);
            rc = -1;
        }
    }

    llama_free(ctx);
    return rc;
}

static int run_cycle(const char * path, int baseline, llama_token gen[2][N_GEN]) {
    struct llama_model * model = load_model(path, baseline ? NULL : "0-3,1-2");
    if (!model) {
        fprintf(stderr, "model load failed\n");
        return -1;
    }

    int rc = 0;
    int32_t order[MAX_ORDER];
    struct saved_state st = { 0 };

    if (!baseline) {
        const int32_t n = llama_model_get_layer_order(model, order, MAX_ORDER);
        if (n != 6 || llama_model_n_layer(model) != 6 || llama_model_n_layer_weights(model) != 4) {
            fprintf(stderr, "unexpected load-time order: n=%d n_layer=%d n_weights=%d\n",
                    n, llama_model_n_layer(model), llama_model_n_layer_weights(model));
            rc = -1;
            goto done;
        }
    }

    if (generate(model, gen[0], !baseline, &st, NULL, 0) != 0) {
        rc = -1;
        goto done;
    }

    if (!baseline) {
        const int32_t new_order[5] = { 3, 2, 1, 0, 1 };
        if (llama_model_set_layer_order(model, new_order, 5) != 0) {
            fprintf(stderr, "llama_model_set_layer_order {3,2,1,0,1} failed\n");
            rc = -1;
            goto done;
        }
        /* an invalid order (layer 7 does not exist) must be refused and leave the order alone */
        const int32_t bad_order[2] = { 0, 7 };
        if (llama_model_set_layer_order(model, bad_order, 2) != -1) {
            fprintf(stderr, "llama_model_set_layer_order {0,7} was not refused with -1\n");
            rc = -1;
            goto done;
        }
        const int32_t n = llama_model_get_layer_order(model, order, MAX_ORDER);
        if (n != 5 || memcmp(order, new_order, sizeof(new_order)) != 0) {
            fprintf(stderr, "re-order not applied (n=%d)\n", n);
            rc = -1;
            goto done;
        }
    }

    /* the state saved under the first order restores only where the order did not change */
    if (generate(model, gen[1], 0, NULL, &st, baseline) != 0) {
        rc = -1;
        goto done;
    }

    if (!baseline) {
        /* restore the file's order (identity over the 4 weight layers) */
        if (llama_model_set_layer_order(model, NULL, 0) != 0 || llama_model_n_layer(model) != 4) {
            fprintf(stderr, "restoring the file's order failed\n");
            rc = -1;
            goto done;
        }
    }

done:
    saved_state_free(&st);
    llama_model_free(model);

    if (rc == 0 && !baseline) {
        /* error path of the loader: an order naming layers the file does not have */
        struct llama_model * bad = load_model(path, "0-9");
        if (bad) {
            fprintf(stderr, "load with layer_order \"0-9\" on a 4-layer model did not fail\n");
            llama_model_free(bad);
            rc = -1;
        }
        /* error path of the parser */
        char err[256] = { 0 };
        if (llama_layer_order_parse("2-x", 4, order, MAX_ORDER, err, sizeof(err)) != -1 || err[0] == 0) {
            fprintf(stderr, "llama_layer_order_parse(\"2-x\") did not fail with a message\n");
            rc = -1;
        }
    }
    return rc;
}

static void * volatile leak_sink;

/* Bytes of heap in use (glibc's malloc; meaningless under valgrind, which replaces malloc) */
static long heap_in_use(void) {
#ifdef LEAK_CYCLES_HAVE_VALGRIND
    if (RUNNING_ON_VALGRIND) {
        return -1;
    }
#endif
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 33))
    const struct mallinfo2 mi = mallinfo2();
    return (long) (mi.uordblks + mi.hblkhd);
#else
    return -1;
#endif
}

/* VmRSS of this process in KB (Linux), -1 if unknown */
static long rss_kb(void) {
    FILE * f = fopen("/proc/self/status", "r");
    if (!f) {
        return -1;
    }
    char line[256];
    long kb = -1;
    while (fgets(line, sizeof(line), f)) {
        if (strncmp(line, "VmRSS:", 6) == 0) {
            kb = strtol(line + 6, NULL, 10);
            break;
        }
    }
    fclose(f);
    return kb;
}

int main(int argc, char ** argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL.gguf N_CYCLES [patch|baseline]\n", argv[0]);
        return 2;
    }
    const char * path = argv[1];
    const int n_cycles = atoi(argv[2]);
    const int baseline = argc > 3 && strcmp(argv[3], "baseline") == 0;
    if (n_cycles <= 0 || (argc > 3 && !baseline && strcmp(argv[3], "patch") != 0)) {
        fprintf(stderr, "bad arguments\n");
        return 2;
    }

    if (!getenv("LEAK_CYCLES_VERBOSE")) {
        llama_log_set(quiet_log, NULL);
    }
    llama_backend_init();

    llama_token first[2][N_GEN] = { { 0 } };
    llama_token gen[2][N_GEN];
    int failures = 0;
    int mismatches = 0;
    long rss_1 = -1, rss_10 = -1, heap_1 = -1, heap_10 = -1, heap_half = -1;

    /* LEAK_CYCLES_INJECT_LEAK: lose one block per cycle on purpose, to prove the checker sees leaks;
     * LEAK_CYCLES_INJECT_LEAK=reachable: keep them all reachable, chained from leak_sink (the growth
     * that only a comparison between cycles shows) */
    const char * inject_env = getenv("LEAK_CYCLES_INJECT_LEAK");
    const int inject_leak = inject_env != NULL;
    const int inject_reachable = inject_leak && strcmp(inject_env, "reachable") == 0;

    for (int c = 0; c < n_cycles; c++) {
        if (inject_leak) {
            void ** block = malloc(4096);
            memset(block, c, 4096);
            block[0] = inject_reachable ? leak_sink : NULL;
            leak_sink = block;
        }
        if (run_cycle(path, baseline, gen) != 0) {
            fprintf(stderr, "cycle %d failed\n", c);
            failures++;
            break;
        }
#ifdef LEAK_CYCLES_HAVE_VALGRIND
        /* under memcheck: a leak search after cycle 10 (1 if fewer) and an "added" search at the end
         * show whether the blocks still reachable grew between cycles - what the summary at exit,
         * taken after every static destructor ran, cannot show */
        if (RUNNING_ON_VALGRIND && c == (n_cycles > 10 ? 9 : 0)) {
            VALGRIND_PRINTF("leak_cycles: leak search after cycle %d\n", c + 1);
            VALGRIND_DO_LEAK_CHECK;
        }
        if (RUNNING_ON_VALGRIND && c == n_cycles - 1 && c > 0) {
            VALGRIND_PRINTF("leak_cycles: added leak search after cycle %d\n", c + 1);
            VALGRIND_DO_ADDED_LEAK_CHECK;
        }
#endif
        if (c == 0) {
            rss_1  = rss_kb();
            heap_1 = heap_in_use();
            memcpy(first, gen, sizeof(first));
        } else if (memcmp(first, gen, sizeof(first)) != 0) {
            mismatches++;
        }
        if (c == 9) {
            rss_10  = rss_kb();
            heap_10 = heap_in_use();
        }
        if (c == n_cycles / 2 - 1) {
            heap_half = heap_in_use();
        }
    }

    const long rss_last  = rss_kb();
    const long heap_last = heap_in_use();
    llama_backend_free();

    /* between cycles nothing of ours is allocated (the injected leak aside): heap in use must not grow */
    printf("leak_cycles: VmRSS after cycle 1: %ld KB, after cycle 10: %ld KB, after the last cycle: %ld KB\n",
           rss_1, rss_10, rss_last);
    printf("leak_cycles: heap in use after cycle 1: %ld B, after cycle 10: %ld B, after cycle %d: %ld B, "
           "after the last cycle: %ld B\n", heap_1, heap_10, n_cycles / 2, heap_half, heap_last);
    printf("leak_cycles: mode=%s cycles=%d failures=%d mismatches=%d first-order tokens:",
           baseline ? "baseline" : "patch", n_cycles, failures, mismatches);
    for (int i = 0; i < N_GEN; i++) {
        printf(" %d", first[0][i]);
    }
    printf(" | second-order tokens:");
    for (int i = 0; i < N_GEN; i++) {
        printf(" %d", first[1][i]);
    }
    printf("\n");

    return failures == 0 && mismatches == 0 ? 0 : 1;
}
