/* kvq: command-line front end. Runs a GGUF Llama-family model with its KV cache stored by libkvq in 16/8/4/2 bits.
 *   kvq run         generate text (streams tokens, then a speed and KV memory footer; --compare side by side)
 *   kvq perplexity  perplexity of a text file, one KV type or a comparison table of several
 *   kvq capacity    what fits in a memory budget, or what a context needs, per KV type
 *   kvq tokenize    token ids of a text (for checking the tokenizer)
 *   kvq passkey     pass-key retrieval grid (depth x length) per KV type
 *   kvq gen-model   a GGUF of a real model's shape with seeded random weights
 *   kvq bench       end-to-end prefill/decode speed per KV type at several depths (CPU or --gpu)
 *   kvq calibrate   per-layer KV types for a bit budget, from each layer's measured sensitivity
 * Everything but main() is in the kvq_cli_core library (cli.h). */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

int main(int argc, char **argv) {
    /* No OMP_WAIT_POLICY games: the engine runs weights, attention and prefill's sgemm on its own thread pool
     * (src/model/tpool.h), which spins between the products of a step and sleeps after. */
    if (argc < 2 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "help") == 0) {
        kvq_cli_usage_main(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    const char *cmd = argv[1];
    switch (kvq_cli_cmd_from_name(cmd)) {
    case KVQ_CLI_RUN: return kvq_cli_run(argc - 2, argv + 2);
    case KVQ_CLI_PPL: return kvq_cli_perplexity(argc - 2, argv + 2);
    case KVQ_CLI_CAP: return kvq_cli_capacity(argc - 2, argv + 2);
    case KVQ_CLI_TOK: return kvq_cli_tokenize(argc - 2, argv + 2);
    case KVQ_CLI_PASSKEY: return kvq_cli_passkey(argc - 2, argv + 2);
    default: break;
    }
    if (strcmp(cmd, "gen-model") == 0) return kvq_cli_gen_model(argc - 2, argv + 2);
    if (strcmp(cmd, "bench") == 0) return kvq_cli_bench(argc - 2, argv + 2);
    if (strcmp(cmd, "calibrate") == 0) return kvq_cli_calibrate(argc - 2, argv + 2);
    if (strcmp(cmd, "version") == 0 || strcmp(cmd, "--version") == 0) {
        printf("kvq %s (CPU attention: %s)\n", kvq_version_string(), kvq_cpu_backend());
        return 0;
    }
    fprintf(stderr, "kvq: unknown command '%s'\n", cmd);
    kvq_cli_usage_main(stderr);
    return 2;
}
