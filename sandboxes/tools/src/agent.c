/* Agent-facing tools (PaperBench style): read_file_chunk, search_file,
 * write_file, append_file, replace_in_file, submit.  Their output is read
 * by a language model, so it is bounded (long lines are cut) and ends with
 * a bracketed status line saying where the agent is in the file. */
#include "common.h"

#include <fcntl.h>
#include <unistd.h>

/* Lines longer than this are cut in read_file_chunk / search_file. */
#define MAX_LINE_BYTES 2000

/* Loads PATH whole.  Prints the error and returns false on failure. */
static bool load_file(const char *path, buf_t *b)
{
    FILE *f = open_input(path);
    if (!f)
        return false;
    int e = read_stream(f, b);
    close_input(f);
    if (e) {
        err_path(path, e);
        buf_free(b);
        return false;
    }
    return true;
}

/* Splits B into lines (without their '\n').  A last line without '\n'
 * still counts; an empty file has no lines. */
typedef struct {
    const char *p;
    size_t len;
} span_t;

static span_t *split_lines(const buf_t *b, size_t *count)
{
    size_t n = 0, cap = 64;
    span_t *v = xmalloc(cap * sizeof *v);
    for (size_t i = 0; i < b->len;) {
        const char *nl = memchr(b->data + i, '\n', b->len - i);
        size_t end = nl ? (size_t)(nl - b->data) : b->len;
        if (n == cap)
            v = xrealloc(v, (cap *= 2) * sizeof *v);
        v[n].p = b->data + i;
        v[n++].len = end - i;
        i = end + 1;
    }
    *count = n;
    return v;
}

static void put_line_body(const span_t *l)
{
    if (l->len > MAX_LINE_BYTES) {
        out_write(l->p, MAX_LINE_BYTES);
        printf("... [line truncated, %zu bytes]", l->len);
    } else {
        out_write(l->p, l->len);
    }
    putchar('\n');
}

/* Parses a positive line/page number argument. */
static bool parse_positive(const char *s, uint64_t *v)
{
    return parse_count(s, v) && *v > 0;
}

/* ---- read_file_chunk -------------------------------------------------- */

int tool_read_file_chunk(int argc, char **argv)
{
    const char *usage = "PATH [START_LINE [MAX_LINES]]";
    opts_t o;
    int c;
    opts_init(&o, argc, argv, "", false);
    while ((c = opts_next(&o)) != 0)
        return usage_error(usage, NULL);
    if (o.noperands < 1 || o.noperands > 3)
        return usage_error(usage, o.noperands < 1 ? "missing PATH" : "too many arguments");
    const char *path = o.operands[0];
    uint64_t start = 1, max = 50;
    if (o.noperands > 1 && !parse_positive(o.operands[1], &start))
        return usage_error(usage, "START_LINE must be a positive integer, got '%s'", o.operands[1]);
    if (o.noperands > 2 && !parse_positive(o.operands[2], &max))
        return usage_error(usage, "MAX_LINES must be a positive integer, got '%s'", o.operands[2]);

    buf_t b = {0};
    if (!load_file(path, &b))
        return EXIT_ERR;
    if (looks_binary(b.data, b.len)) {
        printf("[binary file: %zu bytes]\n", b.len);
        buf_free(&b);
        return EXIT_OK;
    }
    size_t total;
    span_t *lines = split_lines(&b, &total);
    int status = EXIT_OK;
    if (total == 0) {
        printf("[file is empty]\n");
    } else if (start > total) {
        printf("[start line %llu is past the end: %zu lines]\n", (unsigned long long)start, total);
        status = EXIT_ERR;
    } else {
        uint64_t end = max > total - start + 1 ? total : start + max - 1;
        for (uint64_t i = start; i <= end; i++) {
            printf("%6llu\t", (unsigned long long)i);
            put_line_body(&lines[i - 1]);
        }
        printf("[lines %llu-%llu of %zu]\n", (unsigned long long)start, (unsigned long long)end, total);
    }
    free(lines);
    buf_free(&b);
    return status;
}

/* ---- search_file ------------------------------------------------------ */

int tool_search_file(int argc, char **argv)
{
    const char *usage = "[-i] PATH PATTERN [CONTEXT_LINES [PAGE [PAGE_SIZE]]]";
    bool icase = false;
    opts_t o;
    int c;
    /* options only before PATH: the pattern may itself start with '-' */
    opts_init(&o, argc, argv, "i", false);
    while ((c = opts_next(&o)) != 0) {
        if (c == 'i')
            icase = true;
        else
            return usage_error(usage, NULL);
    }
    if (o.noperands < 2 || o.noperands > 5)
        return usage_error(usage, o.noperands < 2 ? "missing PATH or PATTERN" : "too many arguments");
    const char *path = o.operands[0], *pat = o.operands[1];
    uint64_t ctx = 2, page = 1, page_size = 10;
    if (o.noperands > 2 && !parse_count(o.operands[2], &ctx))
        return usage_error(usage, "CONTEXT_LINES must be a non-negative integer, got '%s'", o.operands[2]);
    if (o.noperands > 3 && !parse_positive(o.operands[3], &page))
        return usage_error(usage, "PAGE must be a positive integer, got '%s'", o.operands[3]);
    if (o.noperands > 4 && !parse_positive(o.operands[4], &page_size))
        return usage_error(usage, "PAGE_SIZE must be a positive integer, got '%s'", o.operands[4]);
    size_t plen = strlen(pat);
    if (plen == 0)
        return usage_error(usage, "PATTERN must not be empty");

    buf_t b = {0};
    if (!load_file(path, &b))
        return EXIT_ERR;
    if (looks_binary(b.data, b.len)) {
        printf("[binary file: %zu bytes]\n", b.len);
        buf_free(&b);
        return EXIT_OK;
    }
    size_t total;
    span_t *lines = split_lines(&b, &total);
    /* indexes of matching lines */
    size_t nm = 0;
    size_t *hits = xmalloc((total ? total : 1) * sizeof *hits);
    for (size_t i = 0; i < total; i++)
        if (find_bytes(lines[i].p, lines[i].len, pat, plen, icase))
            hits[nm++] = i;

    int status = EXIT_OK;
    uint64_t pages = nm ? (nm + page_size - 1) / page_size : 0;
    if (nm == 0) {
        printf("[no matches for \"%s\"]\n", pat);
        status = EXIT_ERR;
    } else if (page > pages) {
        printf("[page %llu is past the end: %zu matches, %llu pages]\n", (unsigned long long)page, nm,
               (unsigned long long)pages);
        status = EXIT_ERR;
    } else {
        size_t first = (size_t)((page - 1) * page_size);
        size_t last = nm - first > page_size ? first + (size_t)page_size : nm; /* exclusive */
        size_t printed_to = 0; /* 1-based number of the last printed line, 0 = none */
        for (size_t k = first; k < last; k++) {
            size_t m = hits[k];
            size_t lo = m > ctx ? m - (size_t)ctx : 0;
            size_t hi = total - 1 - m > ctx ? m + (size_t)ctx : total - 1;
            /* hits of this page that are inside the context also print as
             * matches; later hits extend the group, like grep -C */
            if (printed_to && lo > printed_to)
                printf("--\n");
            if (lo < printed_to)
                lo = printed_to;
            for (size_t i = lo; i <= hi; i++) {
                bool is_hit = find_bytes(lines[i].p, lines[i].len, pat, plen, icase) != NULL;
                printf("%zu%c", i + 1, is_hit ? ':' : '-');
                put_line_body(&lines[i]);
            }
            if (hi + 1 > printed_to)
                printed_to = hi + 1;
        }
        printf("[matches %zu-%zu of %zu, page %llu of %llu]\n", first + 1, last, nm, (unsigned long long)page,
               (unsigned long long)pages);
    }
    free(hits);
    free(lines);
    buf_free(&b);
    return status;
}

/* ---- write_file / append_file ------------------------------------------ */

static int write_from_stdin(int argc, char **argv, bool append)
{
    const char *usage = "PATH   (content on standard input)";
    opts_t o;
    int c;
    opts_init(&o, argc, argv, "", false);
    while ((c = opts_next(&o)) != 0)
        return usage_error(usage, NULL);
    if (o.noperands != 1)
        return usage_error(usage, o.noperands ? "too many arguments" : "missing PATH");
    const char *path = o.operands[0];

    /* read all input first: a failed read must not truncate the file */
    buf_t b = {0};
    int e = read_stream(stdin, &b);
    if (e) {
        err_path("standard input", e);
        return EXIT_ERR;
    }
    char *failed = NULL;
    e = make_parents(path, &failed);
    if (e) {
        err_path(failed, e);
        free(failed);
        buf_free(&b);
        return EXIT_ERR;
    }
    int fd = open(path, O_WRONLY | O_CREAT | (append ? O_APPEND : O_TRUNC), 0666);
    if (fd < 0) {
        err_path(path, errno);
        buf_free(&b);
        return EXIT_ERR;
    }
    size_t off = 0;
    while (off < b.len) {
        ssize_t w = write(fd, b.data + off, b.len - off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            err_path(path, errno);
            close(fd);
            buf_free(&b);
            return EXIT_ERR;
        }
        off += (size_t)w;
    }
    if (close(fd) != 0) {
        err_path(path, errno);
        buf_free(&b);
        return EXIT_ERR;
    }
    printf("%s %zu bytes to %s\n", append ? "appended" : "wrote", b.len, path);
    buf_free(&b);
    return EXIT_OK;
}

int tool_write_file(int argc, char **argv) { return write_from_stdin(argc, argv, false); }
int tool_append_file(int argc, char **argv) { return write_from_stdin(argc, argv, true); }

/* ---- replace_in_file ---------------------------------------------------- */

int tool_replace_in_file(int argc, char **argv)
{
    const char *usage = "[--all] PATH OLD NEW";
    bool all = false;
    int i = 1;
    /* only "--all" and "--" are options, and only before PATH: OLD and NEW
     * are arbitrary text that may start with '-' */
    for (; i < argc && argv[i][0] == '-' && argv[i][1] == '-'; i++) {
        if (strcmp(argv[i], "--all") == 0) {
            all = true;
        } else if (strcmp(argv[i], "--") == 0) {
            i++;
            break;
        } else {
            return usage_error(usage, "unrecognized option '%s'", argv[i]);
        }
    }
    if (argc - i != 3)
        return usage_error(usage, argc - i < 3 ? "missing argument" : "too many arguments");
    const char *path = argv[i], *old = argv[i + 1], *new = argv[i + 2];
    size_t olen = strlen(old), nlen = strlen(new);
    if (olen == 0)
        return usage_error(usage, "OLD must not be empty");

    buf_t b = {0};
    if (!load_file(path, &b))
        return EXIT_ERR;
    size_t count = 0;
    for (const char *p = b.data, *end = b.data + b.len;
         (p = find_bytes(p, (size_t)(end - p), old, olen, false)) != NULL; p += olen)
        count++;
    if (count == 0) {
        err_msg("OLD not found in %s", path);
        buf_free(&b);
        return EXIT_ERR;
    }
    if (count > 1 && !all) {
        err_msg("OLD occurs %zu times in %s; give more context or use --all", count, path);
        buf_free(&b);
        return EXIT_ERR;
    }
    buf_t out = {0};
    const char *p = b.data, *end = b.data + b.len, *hit;
    while ((hit = find_bytes(p, (size_t)(end - p), old, olen, false)) != NULL) {
        buf_append(&out, p, (size_t)(hit - p));
        buf_append(&out, new, nlen);
        p = hit + olen;
    }
    buf_append(&out, p, (size_t)(end - p));
    buf_free(&b);

    int fd = open(path, O_WRONLY | O_TRUNC);
    int status = EXIT_OK;
    if (fd < 0) {
        err_path(path, errno);
        status = EXIT_ERR;
    } else {
        size_t off = 0;
        while (off < out.len) {
            ssize_t w = write(fd, out.data + off, out.len - off);
            if (w < 0 && errno == EINTR)
                continue;
            if (w < 0) {
                err_path(path, errno);
                status = EXIT_ERR;
                break;
            }
            off += (size_t)w;
        }
        if (close(fd) != 0 && status == EXIT_OK) {
            err_path(path, errno);
            status = EXIT_ERR;
        }
    }
    if (status == EXIT_OK)
        printf("replaced %zu occurrence(s) in %s\n", count, path);
    buf_free(&out);
    return status;
}

/* ---- submit ------------------------------------------------------------ */

int tool_submit(int argc, char **argv)
{
    /* The host ends the episode when it sees this tool run; the output is
     * just a receipt for the transcript. */
    fputs("submitted:", stdout);
    for (int i = 1; i < argc; i++) {
        putchar(' ');
        fputs(argv[i], stdout);
    }
    putchar('\n');
    return EXIT_OK;
}
