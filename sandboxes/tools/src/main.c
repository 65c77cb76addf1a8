/* `coreutils`: one multi-call program holding every guest tool, chosen by
 * basename(argv[0]) like busybox.  One module means one compilation in
 * wasmtime's cache for all tools, and klongd only has to set argv[0].
 * "coreutils TOOL ARGS..." also works, and "coreutils --list" prints the
 * tool names one per line. */
#include "common.h"

static const struct {
    const char *name;
    tool_fn fn;
} tools[] = {
    {"append_file", tool_append_file},
    {"cat", tool_cat},
    {"cp", tool_cp},
    {"cut", tool_cut},
    {"echo", tool_echo},
    {"false", tool_false},
    {"grep", tool_grep},
    {"head", tool_head},
    {"ls", tool_ls},
    {"mkdir", tool_mkdir},
    {"mv", tool_mv},
    {"read_file_chunk", tool_read_file_chunk},
    {"replace_in_file", tool_replace_in_file},
    {"rm", tool_rm},
    {"search_file", tool_search_file},
    {"seq", tool_seq},
    {"simulate", tool_simulate},
    {"sort", tool_sort},
    {"submit", tool_submit},
    {"tail", tool_tail},
    {"touch", tool_touch},
    {"tr", tool_tr},
    {"true", tool_true},
    {"wc", tool_wc},
    {"write_file", tool_write_file},
};

static tool_fn find_tool(const char *name, size_t len)
{
    for (size_t i = 0; i < sizeof tools / sizeof tools[0]; i++)
        if (strlen(tools[i].name) == len && memcmp(tools[i].name, name, len) == 0)
            return tools[i].fn;
    return NULL;
}

/* basename without a trailing ".wasm" or ".exe", so "cat.wasm" is cat. */
static tool_fn lookup(const char *argv0, const char **name_out)
{
    const char *b = strrchr(argv0, '/');
    b = b ? b + 1 : argv0;
    size_t len = strlen(b);
    if (len > 5 && strcmp(b + len - 5, ".wasm") == 0)
        len -= 5;
    *name_out = b;
    return find_tool(b, len);
}

int main(int argc, char **argv)
{
    /* Big fully-buffered stdout: tools emit many small writes, and each
     * write is a host call under WASI. */
    static char outbuf[1 << 16];
    setvbuf(stdout, outbuf, _IOFBF, sizeof outbuf);

    if (argc < 1 || !argv[0]) {
        fprintf(stderr, "coreutils: no argv[0]\n");
        return EXIT_USAGE;
    }
    const char *name;
    tool_fn fn = lookup(argv[0], &name);
    if (!fn) {
        /* Not invoked under a tool name: "coreutils TOOL ARGS...". */
        if (argc >= 2 && strcmp(argv[1], "--list") == 0) {
            for (size_t i = 0; i < sizeof tools / sizeof tools[0]; i++)
                printf("%s\n", tools[i].name);
            return finish_output(EXIT_OK);
        }
        if (argc >= 2 && (fn = lookup(argv[1], &name)) != NULL) {
            argc--;
            argv++;
        } else {
            fprintf(stderr, "coreutils: unknown tool '%s'\nusage: coreutils TOOL [ARG...] | coreutils --list\n",
                    argc >= 2 ? argv[1] : name);
            return EXIT_USAGE;
        }
    }
    g_prog = name;
    /* Keep messages on the bare tool name, e.g. "cat", not "cat.wasm". */
    static char progbuf[64];
    size_t n = strlen(name);
    if (n > 5 && strcmp(name + n - 5, ".wasm") == 0 && n - 5 < sizeof progbuf) {
        memcpy(progbuf, name, n - 5);
        progbuf[n - 5] = '\0';
        g_prog = progbuf;
    }
    int status = fn(argc, argv);
    return finish_output(status);
}
