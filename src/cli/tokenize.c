/* kvq tokenize: token ids of a text (for checking the tokenizer against another implementation). */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "gguf.h"
#include "model_err.h"
#include "tokenizer.h"

int kvq_cli_tokenize(int argc, char **argv) {
    kvq_cli_opts o;
    int r = kvq_cli_parse_or_exit(KVQ_CLI_TOK, argc, argv, &o);
    if (r >= 0) return r;
    char err[KVQ_CLI_ERR_LEN];
    size_t len = 0;
    char *text = o.file ? kvq_cli_read_file(o.file, o.max_file, &len, err, sizeof err) : strdup(o.prompt);
    if (!text) {
        if (o.file) fprintf(stderr, "kvq tokenize: -f: %s\n", err);
        else fprintf(stderr, "kvq tokenize: out of memory\n");
        return 1;
    }
    if (!o.file) len = strlen(text);
    if (o.chat && memchr(text, '\0', len)) {
        fprintf(stderr, "kvq tokenize: --chat: the text has a NUL byte\n");
        free(text);
        return 1;
    }
    kvq_cli_loaded L;
    if (kvq_cli_load(&o, &L, 0)) {
        free(text);
        return 1;
    }
    tok_ids ids = {0};
    kvq_status st = o.chat ? tok_encode_chat(L.tok, o.system, text, &ids) : tok_encode(L.tok, text, len, 1, &ids);
    free(text);
    int rc = 0;
    if (st) rc = kvq_cli_die(KVQ_CLI_TOK, "tokenizing", st);
    else if (o.ids) {
        for (size_t i = 0; i < ids.n; i++) printf("%d%c", ids.ids[i], i + 1 == ids.n ? '\n' : ' ');
    } else {
        uint64_t h = 1469598103934665603ull;
        for (size_t i = 0; i < ids.n; i++)
            for (int b = 0; b < 4; b++) h = (h ^ (((uint32_t)ids.ids[i] >> (8 * b)) & 0xff)) * 1099511628211ull;
        printf("tokens %zu fnv1a %016llx\n", ids.n, (unsigned long long)h);
    }
    tok_ids_free(&ids);
    kvq_cli_unload(&L);
    return rc;
}
