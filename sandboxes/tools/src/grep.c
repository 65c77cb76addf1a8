/* grep: POSIX regular expressions from the C library (wasi-libc has musl's
 * regcomp/regexec), basic syntax by default, -E extended, -F fixed
 * strings.  Lines are matched byte-wise (C locale); a file with a NUL byte
 * is binary and only reported as "Binary file NAME matches". */
#include "common.h"

#include <ctype.h>
#include <regex.h>

typedef struct {
    /* options */
    bool number, icase, invert, count, list, recursive, fixed, extended;
    bool quiet, no_messages, only_matching, word;
    int with_name; /* -1 = decide from the operands, 0 = -h, 1 = -H */
    uint64_t before, after;
    /* patterns */
    char **pats;
    size_t npats;
    regex_t *res;
    /* state */
    bool any_selected, error;
    bool printed_group; /* for the "--" separator between context groups */
} grep_t;

/* Does LINE (LEN bytes, NUL-terminated at LEN) match any pattern?  If
 * SO/EO are given, returns the leftmost match starting at or after FROM. */
static bool match_at(grep_t *g, const char *line, size_t len, size_t from, size_t *so, size_t *eo)
{
    bool found = false;
    size_t best_so = 0, best_eo = 0;
    for (size_t p = 0; p < g->npats; p++) {
        size_t start = from;
        for (;;) {
            size_t s, e;
            if (g->fixed) {
                size_t plen = strlen(g->pats[p]);
                const char *hit = find_bytes(line + start, len - start, g->pats[p], plen, g->icase);
                if (!hit)
                    break;
                s = (size_t)(hit - line);
                e = s + plen;
            } else {
                regmatch_t m[1];
                /* the line is a C string here, so a NUL ends it early;
                 * only binary files have NULs and they aren't printed */
                if (regexec(&g->res[p], line + start, 1, m, start > 0 ? REG_NOTBOL : 0) != 0)
                    break;
                s = start + (size_t)m[0].rm_so;
                e = start + (size_t)m[0].rm_eo;
            }
            if (g->word) {
                /* -w: the match must be a whole word; else retry further on */
                bool lok = s == 0 || !(isalnum((unsigned char)line[s - 1]) || line[s - 1] == '_');
                bool rok = e >= len || !(isalnum((unsigned char)line[e]) || line[e] == '_');
                if (!lok || !rok) {
                    if (s >= len)
                        break;
                    start = s + 1;
                    continue;
                }
            }
            if (!found || s < best_so || (s == best_so && e > best_eo)) {
                best_so = s;
                best_eo = e;
            }
            found = true;
            break;
        }
    }
    if (found && so) {
        *so = best_so;
        *eo = best_eo;
    }
    return found;
}

static void print_prefix(grep_t *g, const char *name, uint64_t lineno, char sep)
{
    if (g->with_name == 1)
        printf("%s%c", name, sep);
    if (g->number)
        printf("%llu%c", (unsigned long long)lineno, sep);
}

/* One kept line for -B context. */
typedef struct {
    char *p;
    size_t len;
    uint64_t no;
} ctxline_t;

/* Greps one open stream.  Returns true if any line was selected. */
static bool grep_stream(grep_t *g, FILE *f, const char *name)
{
    bool binary = false;
    uint64_t lineno = 0, nsel = 0, last_printed = 0, after_left = 0;
    char *line = NULL;
    size_t cap = 0;
    ptrdiff_t n;
    /* ring of the last B lines for -B; grows on demand so a huge -B
     * costs nothing up front */
    size_t ring_cap = 0, ring_n = 0, ring_head = 0;
    ctxline_t *ring = NULL;

    while ((n = read_line(f, &line, &cap)) >= 0) {
        size_t len = (size_t)n;
        if (len && line[len - 1] == '\n')
            line[--len] = '\0';
        lineno++;
        if (lineno == 1 || !binary) {
            if (memchr(line, '\0', len))
                binary = true;
        }
        bool m = match_at(g, line, len, 0, NULL, NULL) != g->invert;
        if (m) {
            nsel++;
            g->any_selected = true;
            if (g->quiet)
                break;
            if (g->list)
                break;
            if (g->count)
                continue;
            if (binary)
                break;
            /* context before: print kept lines, with "--" for a gap */
            uint64_t first_no = lineno - ring_n;
            if (g->printed_group && (g->before || g->after) &&
                (last_printed == 0 || last_printed + 1 < (ring_n ? first_no : lineno)))
                printf("--\n");
            for (size_t k = 0; k < ring_n; k++) {
                ctxline_t *c = &ring[(ring_head + k) % ring_cap];
                print_prefix(g, name, c->no, '-');
                out_write(c->p, c->len);
                putchar('\n');
            }
            ring_n = 0;
            if (g->only_matching && !g->invert) {
                size_t from = 0, so, eo;
                while (from <= len && match_at(g, line, len, from, &so, &eo)) {
                    if (eo > so) {
                        print_prefix(g, name, lineno, ':');
                        out_write(line + so, eo - so);
                        putchar('\n');
                    }
                    from = eo > so ? eo : so + 1;
                }
            } else if (!g->only_matching) {
                print_prefix(g, name, lineno, ':');
                out_write(line, len);
                putchar('\n');
            }
            last_printed = lineno;
            g->printed_group = true;
            after_left = g->after;
        } else if (after_left > 0 && !g->count && !g->list && !g->quiet && !binary) {
            after_left--;
            print_prefix(g, name, lineno, '-');
            out_write(line, len);
            putchar('\n');
            last_printed = lineno;
        } else if (g->before && !g->count && !g->list && !g->quiet) {
            /* remember for -B */
            if (ring_n == ring_cap && ring_cap < g->before) {
                /* grow, unrolling the ring so it starts at index 0 */
                size_t ncap = ring_cap ? ring_cap * 2 : 8;
                if (ncap > g->before)
                    ncap = (size_t)g->before;
                ctxline_t *nr = xmalloc(ncap * sizeof *nr);
                for (size_t k = 0; k < ring_n; k++)
                    nr[k] = ring[(ring_head + k) % ring_cap];
                free(ring);
                ring = nr;
                ring_cap = ncap;
                ring_head = 0;
            }
            size_t slot = (ring_head + ring_n) % ring_cap;
            if (ring_n == ring_cap) {
                slot = ring_head;
                ring_head = (ring_head + 1) % ring_cap;
                free(ring[slot].p);
            } else {
                ring_n++;
            }
            ring[slot].p = xmemdup(line, len);
            ring[slot].len = len;
            ring[slot].no = lineno;
            continue;
        }
        /* a printed line (match or after-context) empties the ring */
        for (size_t k = 0; k < ring_n; k++)
            free(ring[(ring_head + k) % ring_cap].p);
        ring_n = 0;
        ring_head = 0;
    }
    for (size_t k = 0; k < ring_n; k++)
        free(ring[(ring_head + k) % ring_cap].p);
    free(ring);
    free(line);
    if (ferror(f)) {
        if (!g->no_messages)
            err_path(name, errno ? errno : EIO);
        g->error = true;
    }
    if (g->count && !g->quiet) {
        if (g->with_name == 1)
            printf("%s:", name);
        printf("%llu\n", (unsigned long long)nsel);
    } else if (g->list && nsel && !g->quiet) {
        printf("%s\n", name);
    } else if (binary && nsel && !g->quiet) {
        /* GNU grep 3.5+ wording and stream: a note, not an error */
        fflush(stdout);
        fprintf(stderr, "grep: %s: binary file matches\n", name);
    }
    return nsel > 0;
}

static void grep_path(grep_t *g, const char *path, bool top)
{
    struct stat st;
    if (strcmp(path, "-") == 0) {
        grep_stream(g, stdin, g->with_name == 1 ? "(standard input)" : "-");
        return;
    }
    if ((top ? stat(path, &st) : lstat(path, &st)) != 0) {
        if (!g->no_messages)
            err_path(path, errno);
        g->error = true;
        return;
    }
    if (S_ISDIR(st.st_mode)) {
        if (!g->recursive) {
            if (!g->no_messages)
                err_msg("%s: Is a directory", path);
            g->error = true;
            return;
        }
        size_t n;
        char **names = list_dir(path, &n);
        if (!names) {
            if (!g->no_messages)
                err_path(path, errno);
            g->error = true;
            return;
        }
        for (size_t i = 0; i < n && !(g->quiet && g->any_selected); i++) {
            char *p = strcmp(path, ".") == 0 && top ? xstrdup(names[i]) : path_join(path, names[i]);
            grep_path(g, p, false);
            free(p);
        }
        free_names(names, n);
        return;
    }
    if (!top && !S_ISREG(st.st_mode))
        return; /* -r skips symlinks and devices found while recursing */
    FILE *f = fopen(path, "rb");
    if (!f) {
        if (!g->no_messages)
            err_path(path, errno);
        g->error = true;
        return;
    }
    grep_stream(g, f, path);
    fclose(f);
}

int tool_grep(int argc, char **argv)
{
    const char *usage = "[-nivclrFEwoqshH] [-A N] [-B N] [-C N] [-e PATTERN]... PATTERN [FILE...]";
    grep_t g = {.with_name = -1};
    opts_t o;
    int c;
    g.pats = xmalloc((size_t)argc * sizeof *g.pats);
    opts_init(&o, argc, argv, "nivclrRFEGwoqshHA:B:C:e:#", true);
    while ((c = opts_next(&o)) != 0) {
        uint64_t v;
        switch (c) {
        case 'n': g.number = true; break;
        case 'i': g.icase = true; break;
        case 'v': g.invert = true; break;
        case 'c': g.count = true; break;
        case 'l': g.list = true; break;
        case 'r':
        case 'R': g.recursive = true; break;
        case 'F': g.fixed = true; break;
        case 'E': g.extended = true; break;
        case 'G': g.extended = false; break;
        case 'w': g.word = true; break;
        case 'o': g.only_matching = true; break;
        case 'q': g.quiet = true; break;
        case 's': g.no_messages = true; break;
        case 'h': g.with_name = 0; break;
        case 'H': g.with_name = 1; break;
        case 'e': g.pats[g.npats++] = (char *)o.arg; break;
        case 'A':
        case 'B':
        case 'C':
        case '#':
            if (!parse_count(o.arg, &v))
                return usage_error(usage, "%s: invalid context length argument", o.arg);
            if (c != 'B') g.after = v;
            if (c != 'A') g.before = v;
            break;
        default: return usage_error(usage, NULL);
        }
    }
    int first_file = 0;
    if (g.npats == 0) {
        if (o.noperands == 0)
            return usage_error(usage, "no pattern given");
        g.pats[g.npats++] = o.operands[0];
        first_file = 1;
    }
    /* a pattern with newlines is several patterns, as in GNU grep */
    for (size_t i = 0; i < g.npats; i++) {
        char *nl = strchr(g.pats[i], '\n');
        if (nl) {
            char *rest = xstrdup(nl + 1);
            g.pats[i] = xmemdup(g.pats[i], (size_t)(nl - g.pats[i]));
            g.pats = xrealloc(g.pats, (g.npats + 1) * sizeof *g.pats);
            g.pats[g.npats++] = rest;
        }
    }
    if (!g.fixed) {
        g.res = xmalloc(g.npats * sizeof *g.res);
        int flags = (g.extended ? REG_EXTENDED : 0) | (g.icase ? REG_ICASE : 0);
        for (size_t i = 0; i < g.npats; i++) {
            int e = regcomp(&g.res[i], g.pats[i], flags);
            if (e) {
                char msg[256];
                regerror(e, &g.res[i], msg, sizeof msg);
                err_msg("%s: %s", g.pats[i], msg);
                return EXIT_USAGE;
            }
        }
    }
    int nfiles = o.noperands - first_file;
    char **files = o.operands + first_file;
    static char *dot[] = {".", NULL}, *dash[] = {"-", NULL};
    if (nfiles == 0) {
        files = g.recursive ? dot : dash;
        nfiles = 1;
    }
    if (g.with_name == -1)
        g.with_name = nfiles > 1 || g.recursive;
    for (int i = 0; i < nfiles && !(g.quiet && g.any_selected); i++)
        grep_path(&g, files[i], true);
    if (g.quiet && g.any_selected)
        return EXIT_OK;
    return g.error ? EXIT_USAGE : g.any_selected ? EXIT_OK : EXIT_ERR;
}
