/* Shared declarations for the `coreutils` multi-call program.
 *
 * The same sources build twice: as a WASI preview-1 command module
 * (zig cc --target=wasm32-wasi) that klongd runs inside wasmtime, and
 * natively with the system cc for the fork/exec benchmark.  So only
 * POSIX.1-2008 interfaces that wasi-libc also provides are used here:
 * no fork, no chmod, no users/groups, no signals. */
#ifndef KLONGD_COREUTILS_COMMON_H
#define KLONGD_COREUTILS_COMMON_H

#define _POSIX_C_SOURCE 200809L
#define _DEFAULT_SOURCE 1

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>

/* Exit statuses shared by every tool (grep reuses 1 for "no match"). */
enum { EXIT_OK = 0, EXIT_ERR = 1, EXIT_USAGE = 2 };

/* Name of the running tool, used as the prefix of every message. */
extern const char *g_prog;

/* ---- messages ------------------------------------------------------- */
/* "TOOL: PATH: strerror(errnum)" on stderr. */
void err_path(const char *path, int errnum);
/* "TOOL: message" on stderr (printf-style). */
void err_msg(const char *fmt, ...);
/* Prints "TOOL: message" plus a usage hint and returns EXIT_USAGE. */
int usage_error(const char *usage, const char *fmt, ...);

/* ---- memory: abort cleanly (exit 1, message) instead of crashing ---- */
void *xmalloc(size_t n);
void *xrealloc(void *p, size_t n);
char *xstrdup(const char *s);
char *xmemdup(const void *p, size_t n);

/* A growable byte buffer: used for whole-file reads and building output. */
typedef struct {
    char *data;
    size_t len, cap;
} buf_t;
void buf_reserve(buf_t *b, size_t extra);
void buf_append(buf_t *b, const void *p, size_t n);
void buf_putc(buf_t *b, char c);
void buf_free(buf_t *b);

/* ---- input ---------------------------------------------------------- */
/* Opens PATH for reading ("-" means stdin).  Refuses directories with
 * EISDIR up front, because reading one gives confusing results on some
 * hosts.  On failure prints the error and returns NULL. */
FILE *open_input(const char *path);
void close_input(FILE *f);
/* Reads the whole stream into B (binary-safe).  Returns 0 or an errno. */
int read_stream(FILE *f, buf_t *b);
/* Reads one line (including its '\n' if present) into *LINE, growing it
 * as needed: no fixed line-length limit, NUL bytes preserved.  Returns the
 * length, or -1 at EOF / error (check ferror). */
ptrdiff_t read_line(FILE *f, char **line, size_t *cap);

/* ---- output --------------------------------------------------------- */
void out_write(const void *p, size_t n);
/* Flushes stdout; on failure prints "TOOL: write error: ..." and returns
 * EXIT_ERR, otherwise returns STATUS unchanged. */
int finish_output(int status);

/* ---- option parsing -------------------------------------------------
 * A small getopt replacement so that the wasm and native builds parse
 * identically (glibc's getopt permutes, musl's does not).
 *   spec: option letters; a letter followed by ':' takes an argument;
 *         '#' allows "-NUM" (e.g. head -5), returned as '#' with the
 *         digits in arg.
 *   permute: true  = options may follow operands (GNU style);
 *            false = the first operand ends option parsing.
 * "--" always ends option parsing.  Operands are collected in order. */
typedef struct {
    int argc;
    char **argv;
    const char *spec;
    bool permute;
    int idx;          /* next argv index to look at */
    const char *pos;  /* inside a cluster like -nv */
    const char *arg;  /* argument of the option just returned */
    char **operands;
    int noperands;
    bool only_operands;
} opts_t;
void opts_init(opts_t *o, int argc, char **argv, const char *spec, bool permute);
/* Returns the option letter, 0 when done, or '?' after printing an error. */
int opts_next(opts_t *o);

/* ---- numbers -------------------------------------------------------- */
/* Parses a non-negative decimal count; huge values saturate to
 * UINT64_MAX rather than fail.  Returns false on syntax error. */
bool parse_count(const char *s, uint64_t *out);

/* ---- paths ---------------------------------------------------------- */
/* Joins DIR and NAME with exactly one '/'. Result is malloc'ed. */
char *path_join(const char *dir, const char *name);
const char *base_name(const char *path);
/* Copy of PATH without trailing slashes ("d/" -> "d", "/" stays): WASI
 * hosts reject "d/" in rmdir/mkdir/rename with EINVAL. */
char *strip_slashes(const char *path);
/* Creates every missing parent directory of PATH (like mkdir -p on its
 * dirname).  Returns 0 or an errno; *FAILED names the failing prefix. */
int make_parents(const char *path, char **failed);
/* mkdir -p PATH itself. */
int make_dirs(const char *path, char **failed);
/* Reads the entries of directory PATH (without "." and ".."), sorted by
 * byte order so output is deterministic.  Returns NULL and sets errno on
 * failure; *N receives the count.  Free with free_names. */
char **list_dir(const char *path, size_t *n);
void free_names(char **names, size_t n);
/* True if the buffer looks binary (a NUL byte in the first 8 KiB). */
bool looks_binary(const char *p, size_t n);
/* Finds NEEDLE in HAYSTACK (memmem is not in POSIX). */
const char *find_bytes(const char *hay, size_t hlen, const char *needle, size_t nlen, bool icase);

/* ---- tools ---------------------------------------------------------- */
typedef int (*tool_fn)(int argc, char **argv);

int tool_ls(int, char **);
int tool_cat(int, char **);
int tool_head(int, char **);
int tool_tail(int, char **);
int tool_wc(int, char **);
int tool_grep(int, char **);
int tool_sort(int, char **);
int tool_cut(int, char **);
int tool_tr(int, char **);
int tool_echo(int, char **);
int tool_true(int, char **);
int tool_false(int, char **);
int tool_mkdir(int, char **);
int tool_cp(int, char **);
int tool_mv(int, char **);
int tool_rm(int, char **);
int tool_touch(int, char **);
int tool_seq(int, char **);
int tool_read_file_chunk(int, char **);
int tool_search_file(int, char **);
int tool_write_file(int, char **);
int tool_append_file(int, char **);
int tool_replace_in_file(int, char **);
int tool_submit(int, char **);
/* sim.c: the task family's deterministic experiment simulator */
int tool_simulate(int, char **);

#endif
