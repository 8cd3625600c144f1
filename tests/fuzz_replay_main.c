/* Replays fuzz inputs through a libFuzzer entry point without libFuzzer, so that the corpus of each fuzz target runs
 * as a plain ctest in every build (tests/fuzz.cmake):
 *   fuzz_<name>_replay PATH...   each PATH is a file, or a directory whose files (recursively) are each one input
 * Exits 0 when every input returned; a crash, hang or sanitizer report is the failure. An argument that cannot be read,
 * or no input at all, is an error too: a replay that silently runs nothing would always pass. */
#define _DEFAULT_SOURCE
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv) __attribute__((weak));

static long n_inputs;

static int run_file(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "fuzz replay: cannot open %s\n", path);
        return 1;
    }
    size_t cap = 4096, n = 0;
    uint8_t *buf = malloc(cap);
    for (size_t r; buf && (r = fread(buf + n, 1, cap - n, f)) > 0;) {
        n += r;
        if (n == cap) {
            uint8_t *nb = realloc(buf, cap *= 2);
            if (!nb) free(buf);
            buf = nb;
        }
    }
    int err = ferror(f);
    fclose(f);
    if (!buf || err) {
        free(buf);
        fprintf(stderr, "fuzz replay: cannot read %s\n", path);
        return 1;
    }
    /* an exact-size copy, so ASan catches a read one byte past the input */
    uint8_t *in = malloc(n ? n : 1);
    if (!in) {
        free(buf);
        return 1;
    }
    memcpy(in, buf, n);
    free(buf);
    LLVMFuzzerTestOneInput(in, n);
    free(in);
    n_inputs++;
    return 0;
}

static int run_path(const char *path) {
    struct stat st;
    if (stat(path, &st) != 0) {
        fprintf(stderr, "fuzz replay: %s does not exist\n", path);
        return 1;
    }
    if (!S_ISDIR(st.st_mode)) return run_file(path);
    struct dirent **list;
    int n = scandir(path, &list, NULL, alphasort), bad = n < 0;
    for (int i = 0; i < n; i++) {
        const char *name = list[i]->d_name;
        if (name[0] != '.' && !bad) {
            size_t len = strlen(path) + strlen(name) + 2;
            char *sub = malloc(len);
            if (!sub) bad = 1;
            else {
                snprintf(sub, len, "%s/%s", path, name);
                bad |= run_path(sub);
                free(sub);
            }
        }
        free(list[i]);
    }
    if (n >= 0) free(list);
    return bad;
}

int main(int argc, char **argv) {
    if (LLVMFuzzerInitialize) LLVMFuzzerInitialize(&argc, &argv);
    int bad = 0;
    for (int i = 1; i < argc; i++) bad |= run_path(argv[i]);
    printf("fuzz replay: %ld inputs\n", n_inputs);
    if (n_inputs == 0) {
        fprintf(stderr, "fuzz replay: no input found\n");
        return 1;
    }
    return bad;
}
