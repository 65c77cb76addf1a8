/* Text tools: cat head tail wc sort cut tr echo true false seq.
 * All of them are binary-safe (lengths, not NUL-terminated strings) and
 * have no line-length limit. */
#include "common.h"

#include <ctype.h>
#include <math.h>

/* Iterates the FILE operands ("-" or none = stdin) and calls FN for each
 * opened stream.  Open errors are reported and make the result EXIT_ERR. */
typedef int (*per_file_fn)(FILE *f, const char *name, void *ctx);

static int for_each_input(int nfiles, char **files, per_file_fn fn, void *ctx)
{
    static char *dash[] = {"-", NULL};
    int status = EXIT_OK;
    if (nfiles == 0) {
        nfiles = 1;
        files = dash;
    }
    for (int i = 0; i < nfiles; i++) {
        FILE *f = open_input(files[i]);
        if (!f) {
            status = EXIT_ERR;
            continue;
        }
        if (fn(f, files[i], ctx) != 0)
            status = EXIT_ERR;
        close_input(f);
    }
    return status;
}

/* Reports a read error on NAME (if any) and returns non-zero for it. */
static int check_read(FILE *f, const char *name)
{
    if (ferror(f)) {
        err_path(strcmp(name, "-") == 0 ? "standard input" : name, errno ? errno : EIO);
        return 1;
    }
    return 0;
}

/* ---- true / false ---------------------------------------------------- */

int tool_true(int argc, char **argv)
{
    (void)argc;
    (void)argv;
    return EXIT_OK;
}

int tool_false(int argc, char **argv)
{
    (void)argc;
    (void)argv;
    return EXIT_ERR;
}

/* ---- cat ------------------------------------------------------------- */

static int cat_one(FILE *f, const char *name, void *ctx)
{
    (void)ctx;
    char buf[65536];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0)
        out_write(buf, n);
    return check_read(f, name);
}

int tool_cat(int argc, char **argv)
{
    opts_t o;
    int c;
    opts_init(&o, argc, argv, "u", true); /* -u (unbuffered) is accepted and ignored */
    while ((c = opts_next(&o)) != 0)
        if (c == '?')
            return usage_error("[FILE...]", NULL);
    return for_each_input(o.noperands, o.operands, cat_one, NULL);
}

/* ---- head / tail ------------------------------------------------------ */

typedef struct {
    bool bytes;     /* -c instead of -n */
    bool from_start; /* tail +N: output starting at line/byte N */
    uint64_t count;
    bool headers;   /* "==> NAME <==" between several files */
    int nth;        /* index of the file being printed */
} headtail_t;

static void print_header(headtail_t *ht, const char *name)
{
    if (!ht->headers)
        return;
    printf("%s==> %s <==\n", ht->nth++ ? "\n" : "", strcmp(name, "-") == 0 ? "standard input" : name);
}

static int head_one(FILE *f, const char *name, void *ctx)
{
    headtail_t *ht = ctx;
    print_header(ht, name);
    uint64_t left = ht->count;
    if (ht->bytes) {
        char buf[65536];
        while (left > 0) {
            size_t want = left < sizeof buf ? (size_t)left : sizeof buf;
            size_t n = fread(buf, 1, want, f);
            if (n == 0)
                break;
            out_write(buf, n);
            left -= n;
        }
    } else {
        char *line = NULL;
        size_t cap = 0;
        ptrdiff_t n;
        while (left > 0 && (n = read_line(f, &line, &cap)) >= 0) {
            out_write(line, (size_t)n);
            left--;
        }
        free(line);
    }
    return check_read(f, name);
}

/* tail reads the whole input: simple, exact for pipes, and the sandbox's
 * memory limit bounds it anyway. */
static int tail_one(FILE *f, const char *name, void *ctx)
{
    headtail_t *ht = ctx;
    buf_t b = {0};
    int e = read_stream(f, &b);
    print_header(ht, name);
    if (e) {
        err_path(strcmp(name, "-") == 0 ? "standard input" : name, e);
        buf_free(&b);
        return 1;
    }
    size_t start;
    if (ht->bytes) {
        if (ht->from_start)
            start = ht->count <= 1 ? 0 : (ht->count - 1 >= b.len ? b.len : (size_t)(ht->count - 1));
        else
            start = ht->count >= b.len ? 0 : b.len - (size_t)ht->count;
    } else if (ht->from_start) {
        /* skip count-1 lines */
        start = 0;
        for (uint64_t k = 1; k < ht->count && start < b.len; k++) {
            const char *nl = memchr(b.data + start, '\n', b.len - start);
            start = nl ? (size_t)(nl - b.data) + 1 : b.len;
        }
    } else {
        /* walk back over COUNT line ends; a final line without '\n' counts */
        start = b.len;
        uint64_t seen = 0;
        size_t i = b.len;
        if (i > 0 && b.data[i - 1] == '\n')
            i--; /* the last newline terminates the last line */
        if (ht->count == 0) {
            start = b.len;
        } else {
            start = 0;
            while (i > 0) {
                if (b.data[i - 1] == '\n' && ++seen == ht->count) {
                    start = i;
                    break;
                }
                i--;
            }
        }
    }
    out_write(b.data + start, b.len - start);
    buf_free(&b);
    return 0;
}

static int head_tail(int argc, char **argv, bool is_tail)
{
    const char *usage = is_tail ? "[-n [+]N] [-c [+]N] [FILE...]" : "[-n N] [-c N] [FILE...]";
    headtail_t ht = {.count = 10};
    opts_t o;
    int c;
    opts_init(&o, argc, argv, "n:c:qv#", true);
    bool quiet = false, verbose = false;
    while ((c = opts_next(&o)) != 0) {
        switch (c) {
        case 'n':
        case 'c':
        case '#':
            ht.bytes = c == 'c';
            ht.from_start = is_tail && o.arg[0] == '+';
            if (!parse_count(o.arg[0] == '-' && !is_tail ? "x" : o.arg, &ht.count) ||
                (!is_tail && o.arg[0] == '+'))
                return usage_error(usage, "invalid number of %s: '%s'", c == 'c' ? "bytes" : "lines", o.arg);
            break;
        case 'q':
            quiet = true;
            break;
        case 'v':
            verbose = true;
            break;
        default:
            return usage_error(usage, NULL);
        }
    }
    ht.headers = verbose || (!quiet && o.noperands > 1);
    return for_each_input(o.noperands, o.operands, is_tail ? tail_one : head_one, &ht);
}

int tool_head(int argc, char **argv) { return head_tail(argc, argv, false); }
int tool_tail(int argc, char **argv) { return head_tail(argc, argv, true); }

/* ---- wc -------------------------------------------------------------- */

typedef struct {
    uint64_t lines, words, bytes;
} wc_counts_t;

typedef struct {
    bool l, w, c;
    int width;
    wc_counts_t total;
} wc_t;

static void wc_print(const wc_t *wc, const wc_counts_t *k, const char *name)
{
    const char *sep = "";
    if (wc->l) {
        printf("%s%*llu", sep, wc->width, (unsigned long long)k->lines);
        sep = " ";
    }
    if (wc->w) {
        printf("%s%*llu", sep, wc->width, (unsigned long long)k->words);
        sep = " ";
    }
    if (wc->c)
        printf("%s%*llu", sep, wc->width, (unsigned long long)k->bytes);
    if (name)
        printf(" %s", name);
    putchar('\n');
}

/* Counts lines ('\n' bytes), words (C locale: maximal runs of
 * non-whitespace bytes) and bytes. */
static void wc_count(FILE *f, wc_counts_t *k)
{
    unsigned char buf[65536];
    size_t n;
    bool in_word = false;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) {
        k->bytes += n;
        for (size_t i = 0; i < n; i++) {
            unsigned char ch = buf[i];
            if (ch == '\n')
                k->lines++;
            if (ch == ' ' || (ch >= '\t' && ch <= '\r')) {
                in_word = false;
            } else if (!in_word) {
                in_word = true;
                k->words++;
            }
        }
    }
}

static int wc_one(FILE *f, const char *name, void *ctx)
{
    wc_t *wc = ctx;
    wc_counts_t k = {0, 0, 0};
    wc_count(f, &k);
    if (check_read(f, name))
        return 1;
    wc_print(wc, &k, name);
    wc->total.lines += k.lines;
    wc->total.words += k.words;
    wc->total.bytes += k.bytes;
    return 0;
}

/* GNU wc's column width: digits of the summed sizes of the regular files,
 * at least 7 if any input is not a regular file (a pipe), and 1 when a
 * single count of a single input is printed. */
static int wc_width(int nfiles, char **files, int nfields)
{
    if (nfields == 1 && nfiles <= 1)
        return 1;
    uint64_t total = 0;
    int minw = 1;
    for (int i = 0; i < (nfiles ? nfiles : 1); i++) {
        struct stat st;
        int r = nfiles == 0 || strcmp(files[i], "-") == 0 ? fstat(0, &st) : stat(files[i], &st);
        if (r != 0)
            continue;
        if (S_ISREG(st.st_mode))
            total += (uint64_t)st.st_size;
        else
            minw = 7;
    }
    int w = 1;
    for (; total >= 10; total /= 10)
        w++;
    return w < minw ? minw : w;
}

int tool_wc(int argc, char **argv)
{
    wc_t wc = {0};
    opts_t o;
    int c;
    opts_init(&o, argc, argv, "lwcm", true);
    while ((c = opts_next(&o)) != 0) {
        switch (c) {
        case 'l': wc.l = true; break;
        case 'w': wc.w = true; break;
        case 'c':
        case 'm': wc.c = true; break; /* -m (chars) is treated as bytes */
        default: return usage_error("[-l] [-w] [-c] [FILE...]", NULL);
        }
    }
    if (!wc.l && !wc.w && !wc.c)
        wc.l = wc.w = wc.c = true;
    wc.width = wc_width(o.noperands, o.operands, wc.l + wc.w + wc.c);
    if (o.noperands == 0) {
        /* bare stdin: counts without a name column */
        wc_counts_t k = {0, 0, 0};
        wc_count(stdin, &k);
        if (check_read(stdin, "-"))
            return EXIT_ERR;
        wc_print(&wc, &k, NULL);
        return EXIT_OK;
    }
    int status = for_each_input(o.noperands, o.operands, wc_one, &wc);
    if (o.noperands > 1)
        wc_print(&wc, &wc.total, "total");
    return status;
}

/* ---- sort ------------------------------------------------------------ */

typedef struct {
    const char *p;
    size_t len;
} line_t;

typedef struct {
    bool numeric, reverse, unique, fold, skip_blanks, stable;
    uint64_t kstart, kend; /* fields, 1-based; 0 = whole line / to end */
    int sep;               /* -t character, or -1 for blank-separated */
} sort_opts_t;

static sort_opts_t S;

static bool is_blank(char c) { return c == ' ' || c == '\t'; }

/* Start of field N (1-based).  Without -t a field begins with the blanks
 * that precede it, as in GNU sort. */
static size_t field_start(const line_t *l, uint64_t n)
{
    size_t i = 0;
    for (uint64_t f = 1; f < n && i < l->len; f++) {
        if (S.sep >= 0) {
            const char *q = memchr(l->p + i, S.sep, l->len - i);
            if (!q)
                return l->len;
            i = (size_t)(q - l->p) + 1;
        } else {
            while (i < l->len && is_blank(l->p[i]))
                i++;
            while (i < l->len && !is_blank(l->p[i]))
                i++;
        }
    }
    return i;
}

/* End (exclusive) of field N. */
static size_t field_end(const line_t *l, uint64_t n)
{
    size_t i = field_start(l, n);
    if (S.sep >= 0) {
        const char *q = i < l->len ? memchr(l->p + i, S.sep, l->len - i) : NULL;
        return q ? (size_t)(q - l->p) : l->len;
    }
    while (i < l->len && is_blank(l->p[i]))
        i++;
    while (i < l->len && !is_blank(l->p[i]))
        i++;
    return i;
}

static line_t sort_key(const line_t *l)
{
    line_t k = *l;
    if (S.kstart > 0) {
        size_t a = field_start(l, S.kstart);
        size_t b = S.kend ? field_end(l, S.kend) : l->len;
        if (b < a)
            b = a;
        k.p = l->p + a;
        k.len = b - a;
    }
    if (S.skip_blanks || S.numeric)
        while (k.len && is_blank(*k.p))
            k.p++, k.len--;
    return k;
}

/* Compares leading decimal numbers as strings, so any length works:
 * [-]digits[.digits]; anything else counts as 0. */
static int numcmp(line_t a, line_t b)
{
    struct num {
        bool neg;
        const char *ip;
        size_t il;
        const char *fp;
        size_t fl;
    } n[2];
    line_t in[2] = {a, b};
    for (int k = 0; k < 2; k++) {
        const char *p = in[k].p, *e = p + in[k].len;
        n[k].neg = false;
        if (p < e && *p == '-')
            n[k].neg = true, p++;
        while (p < e && *p == '0')
            p++; /* leading zeros don't matter */
        n[k].ip = p;
        while (p < e && isdigit((unsigned char)*p))
            p++;
        n[k].il = (size_t)(p - n[k].ip);
        n[k].fp = p;
        n[k].fl = 0;
        if (p < e && *p == '.') {
            n[k].fp = ++p;
            while (p < e && isdigit((unsigned char)*p))
                p++;
            n[k].fl = (size_t)(p - n[k].fp);
            while (n[k].fl && n[k].fp[n[k].fl - 1] == '0')
                n[k].fl--; /* trailing zeros don't matter */
        }
        if (n[k].il == 0 && n[k].fl == 0)
            n[k].neg = false; /* -0 == 0 */
    }
    if (n[0].neg != n[1].neg)
        return n[0].neg ? -1 : 1;
    int sign = n[0].neg ? -1 : 1, r;
    if (n[0].il != n[1].il)
        return n[0].il < n[1].il ? -sign : sign;
    if ((r = memcmp(n[0].ip, n[1].ip, n[0].il)) != 0)
        return r < 0 ? -sign : sign;
    size_t m = n[0].fl < n[1].fl ? n[0].fl : n[1].fl;
    if ((r = memcmp(n[0].fp, n[1].fp, m)) != 0)
        return r < 0 ? -sign : sign;
    if (n[0].fl != n[1].fl)
        return n[0].fl < n[1].fl ? -sign : sign;
    return 0;
}

static int sort_cmp(const line_t *x, const line_t *y)
{
    line_t a = sort_key(x), b = sort_key(y);
    int r;
    if (S.numeric) {
        r = numcmp(a, b);
    } else {
        size_t m = a.len < b.len ? a.len : b.len;
        r = 0;
        if (S.fold) {
            for (size_t i = 0; i < m && !r; i++)
                r = toupper((unsigned char)a.p[i]) - toupper((unsigned char)b.p[i]);
        } else if (m) {
            r = memcmp(a.p, b.p, m);
        }
        if (!r)
            r = a.len < b.len ? -1 : a.len > b.len;
    }
    if (!r && !S.stable && !S.unique) {
        /* GNU's last-resort comparison: equal keys fall back to comparing
         * whole lines bytewise; -s (or -u) keeps input order instead */
        size_t m = x->len < y->len ? x->len : y->len;
        r = m ? memcmp(x->p, y->p, m) : 0;
        if (!r)
            r = x->len < y->len ? -1 : x->len > y->len;
    }
    return S.reverse ? -r : r;
}

/* Merge sort: stable, so with -s equal keys keep their input order. */
static void merge_sort(line_t *v, line_t *tmp, size_t n)
{
    if (n < 2)
        return;
    size_t h = n / 2;
    merge_sort(v, tmp, h);
    merge_sort(v + h, tmp, n - h);
    size_t i = 0, j = h, k = 0;
    while (i < h && j < n)
        tmp[k++] = sort_cmp(&v[j], &v[i]) < 0 ? v[j++] : v[i++];
    while (i < h)
        tmp[k++] = v[i++];
    while (j < n)
        tmp[k++] = v[j++];
    memcpy(v, tmp, n * sizeof *v);
}

static int sort_read(FILE *f, const char *name, void *ctx)
{
    if (read_stream(f, ctx) != 0)
        return check_read(f, name) | 1;
    buf_t *b = ctx;
    if (b->len && b->data[b->len - 1] != '\n')
        buf_putc(b, '\n'); /* each file's last line ends there */
    return 0;
}

int tool_sort(int argc, char **argv)
{
    const char *usage = "[-n] [-r] [-u] [-s] [-f] [-b] [-k N[,M]] [-t SEP] [FILE...]";
    opts_t o;
    int c;
    memset(&S, 0, sizeof S);
    S.sep = -1;
    opts_init(&o, argc, argv, "nrufbsk:t:", true);
    while ((c = opts_next(&o)) != 0) {
        switch (c) {
        case 'n': S.numeric = true; break;
        case 'r': S.reverse = true; break;
        case 'u': S.unique = true; break;
        case 'f': S.fold = true; break;
        case 'b': S.skip_blanks = true; break;
        case 's': S.stable = true; break;
        case 'k': {
            /* N[.C][flags][,M[.C][flags]]; character offsets are ignored */
            char *e;
            errno = 0;
            unsigned long long a = strtoull(o.arg, &e, 10), b = 0;
            if (e == o.arg || a == 0 || errno)
                return usage_error(usage, "invalid key '%s'", o.arg);
            while (*e == '.' || isdigit((unsigned char)*e) || isalpha((unsigned char)*e)) {
                if (*e == 'n') S.numeric = true;
                if (*e == 'r') S.reverse = true;
                if (*e == 'b') S.skip_blanks = true;
                if (*e == 'f') S.fold = true;
                e++;
            }
            if (*e == ',') {
                char *f = e + 1;
                b = strtoull(f, &e, 10);
                if (e == f || b == 0)
                    return usage_error(usage, "invalid key '%s'", o.arg);
                while (*e == '.' || isalnum((unsigned char)*e)) {
                    if (*e == 'n') S.numeric = true;
                    if (*e == 'r') S.reverse = true;
                    e++;
                }
            }
            if (*e)
                return usage_error(usage, "invalid key '%s'", o.arg);
            S.kstart = a;
            S.kend = b;
            break;
        }
        case 't':
            if (strcmp(o.arg, "\\t") == 0)
                S.sep = '\t';
            else if (strlen(o.arg) == 1)
                S.sep = (unsigned char)o.arg[0];
            else
                return usage_error(usage, "the separator must be a single character");
            break;
        default:
            return usage_error(usage, NULL);
        }
    }
    buf_t all = {0};
    int status = for_each_input(o.noperands, o.operands, sort_read, &all);

    size_t n = 0, cap = 1024;
    line_t *v = xmalloc(cap * sizeof *v);
    for (size_t i = 0; i < all.len;) {
        const char *nl = memchr(all.data + i, '\n', all.len - i);
        size_t end = nl ? (size_t)(nl - all.data) : all.len;
        if (n == cap)
            v = xrealloc(v, (cap *= 2) * sizeof *v);
        v[n].p = all.data + i;
        v[n++].len = end - i;
        i = end + 1;
    }
    line_t *tmp = xmalloc((n ? n : 1) * sizeof *tmp);
    merge_sort(v, tmp, n);
    for (size_t i = 0; i < n; i++) {
        if (S.unique && i > 0 && sort_cmp(&v[i - 1], &v[i]) == 0)
            continue;
        out_write(v[i].p, v[i].len);
        putchar('\n');
    }
    free(tmp);
    free(v);
    buf_free(&all);
    return status;
}

/* ---- cut ------------------------------------------------------------- */

typedef struct {
    uint64_t lo, hi; /* inclusive, 1-based; hi = UINT64_MAX for "N-" */
} range_t;

typedef struct {
    range_t *r;
    size_t n;
    bool fields, only_delimited;
    char delim;
} cut_t;

/* LIST: comma-separated N, N-M, N-, -M. */
static bool parse_list(const char *s, cut_t *ct)
{
    ct->r = NULL;
    ct->n = 0;
    char *copy = xstrdup(s), *save = copy;
    char *tok = copy;
    bool ok = *s != '\0';
    while (ok && tok) {
        char *comma = strchr(tok, ',');
        if (comma)
            *comma = '\0';
        range_t r;
        char *dash = strchr(tok, '-');
        if (dash) {
            *dash = '\0';
            r.lo = 1;
            r.hi = UINT64_MAX;
            if (*tok && !parse_count(tok, &r.lo))
                ok = false;
            if (dash[1] && !parse_count(dash + 1, &r.hi))
                ok = false;
            if (!*tok && !dash[1])
                ok = false;
        } else {
            ok = parse_count(tok, &r.lo);
            r.hi = r.lo;
        }
        if (ok && (r.lo == 0 || r.hi < r.lo))
            ok = false;
        if (ok) {
            ct->r = xrealloc(ct->r, (ct->n + 1) * sizeof *ct->r);
            ct->r[ct->n++] = r;
        }
        tok = comma ? comma + 1 : NULL;
    }
    free(save);
    return ok;
}

static bool selected(const cut_t *ct, uint64_t pos)
{
    for (size_t i = 0; i < ct->n; i++)
        if (pos >= ct->r[i].lo && pos <= ct->r[i].hi)
            return true;
    return false;
}

static int cut_one(FILE *f, const char *name, void *ctx)
{
    cut_t *ct = ctx;
    char *line = NULL;
    size_t cap = 0;
    ptrdiff_t n;
    while ((n = read_line(f, &line, &cap)) >= 0) {
        size_t len = (size_t)n;
        bool nl = len && line[len - 1] == '\n';
        if (nl)
            len--;
        if (!ct->fields) {
            for (size_t i = 0; i < len; i++)
                if (selected(ct, (uint64_t)i + 1))
                    putchar(line[i]);
        } else if (!memchr(line, ct->delim, len)) {
            /* no delimiter: the whole line, unless -s */
            if (ct->only_delimited)
                continue;
            out_write(line, len);
        } else {
            uint64_t field = 1;
            bool first = true;
            size_t start = 0;
            for (size_t i = 0; i <= len; i++) {
                if (i == len || line[i] == ct->delim) {
                    if (selected(ct, field)) {
                        if (!first)
                            putchar(ct->delim);
                        out_write(line + start, i - start);
                        first = false;
                    }
                    field++;
                    start = i + 1;
                }
            }
        }
        putchar('\n');
    }
    free(line);
    return check_read(f, name);
}

int tool_cut(int argc, char **argv)
{
    const char *usage = "(-f LIST [-d DELIM] [-s] | -c LIST) [FILE...]";
    cut_t ct = {.delim = '\t'};
    const char *list = NULL;
    int mode = 0;
    opts_t o;
    int c;
    opts_init(&o, argc, argv, "f:d:c:b:sn", true);
    while ((c = opts_next(&o)) != 0) {
        switch (c) {
        case 'f':
        case 'c':
        case 'b':
            if (mode && mode != (c == 'f' ? 'f' : 'c'))
                return usage_error(usage, "only one type of list may be specified");
            mode = c == 'f' ? 'f' : 'c';
            list = o.arg;
            break;
        case 'd':
            if (strcmp(o.arg, "\\t") == 0)
                ct.delim = '\t';
            else if (strlen(o.arg) == 1)
                ct.delim = o.arg[0];
            else
                return usage_error(usage, "the delimiter must be a single character");
            break;
        case 's': ct.only_delimited = true; break;
        case 'n': break;
        default: return usage_error(usage, NULL);
        }
    }
    if (!mode)
        return usage_error(usage, "you must specify a list of bytes, characters, or fields");
    ct.fields = mode == 'f';
    if (!parse_list(list, &ct))
        return usage_error(usage, "invalid list '%s'", list);
    int status = for_each_input(o.noperands, o.operands, cut_one, &ct);
    free(ct.r);
    return status;
}

/* ---- tr -------------------------------------------------------------- */

/* Expands a tr SET (escapes, ranges, [:class:]) into its bytes in order.
 * Returns false (after printing an error) on a bad set. */
static bool tr_expand(const char *s, buf_t *out)
{
    static const struct {
        const char *name;
        int (*fn)(int);
    } classes[] = {
        {"alnum", isalnum}, {"alpha", isalpha}, {"blank", isblank}, {"cntrl", iscntrl},
        {"digit", isdigit}, {"graph", isgraph}, {"lower", islower}, {"print", isprint},
        {"punct", ispunct}, {"space", isspace}, {"upper", isupper}, {"xdigit", isxdigit},
    };
    /* first pass: decode escapes into (byte, literal?) tokens */
    size_t n = strlen(s), nt = 0;
    int *tok = xmalloc((n + 1) * sizeof *tok); /* byte, or -1 for a class start */
    const char **cls = xmalloc((n + 1) * sizeof *cls);
    bool *esc = xmalloc(n + 1);
    for (size_t i = 0; i < n;) {
        esc[nt] = false;
        cls[nt] = NULL;
        if (s[i] == '[' && s[i + 1] == ':') {
            const char *end = strstr(s + i + 2, ":]");
            if (end) {
                size_t len = (size_t)(end - (s + i + 2));
                size_t k;
                for (k = 0; k < sizeof classes / sizeof classes[0]; k++)
                    if (strlen(classes[k].name) == len && strncmp(classes[k].name, s + i + 2, len) == 0)
                        break;
                if (k == sizeof classes / sizeof classes[0]) {
                    err_msg("invalid character class '%.*s'", (int)len, s + i + 2);
                    free(tok), free(cls), free(esc);
                    return false;
                }
                tok[nt] = -1;
                cls[nt++] = classes[k].name;
                i = (size_t)(end - s) + 2;
                continue;
            }
        }
        if (s[i] == '\\' && i + 1 < n) {
            char e = s[i + 1];
            esc[nt] = true;
            i += 2;
            switch (e) {
            case 'n': tok[nt++] = '\n'; break;
            case 't': tok[nt++] = '\t'; break;
            case 'r': tok[nt++] = '\r'; break;
            case 'a': tok[nt++] = '\a'; break;
            case 'b': tok[nt++] = '\b'; break;
            case 'f': tok[nt++] = '\f'; break;
            case 'v': tok[nt++] = '\v'; break;
            default:
                if (e >= '0' && e <= '7') {
                    int v = e - '0';
                    for (int k = 0; k < 2 && i < n && s[i] >= '0' && s[i] <= '7'; k++)
                        v = v * 8 + (s[i++] - '0');
                    tok[nt++] = v & 0xff;
                } else {
                    tok[nt++] = (unsigned char)e; /* \\ \- and anything else */
                }
            }
            continue;
        }
        tok[nt++] = (unsigned char)s[i++];
    }
    /* second pass: ranges and classes */
    bool ok = true;
    for (size_t i = 0; i < nt && ok; i++) {
        if (tok[i] == -1) {
            for (size_t k = 0; k < sizeof classes / sizeof classes[0]; k++)
                if (classes[k].name == cls[i])
                    for (int ch = 0; ch < 256; ch++)
                        if (classes[k].fn(ch))
                            buf_putc(out, (char)ch);
        } else if (i + 2 < nt && tok[i + 1] == '-' && !esc[i + 1] && tok[i + 2] != -1) {
            if (tok[i] > tok[i + 2]) {
                err_msg("range-endpoints of '%c-%c' are in reverse collating sequence order", tok[i], tok[i + 2]);
                ok = false;
            }
            for (int ch = tok[i]; ch <= tok[i + 2]; ch++)
                buf_putc(out, (char)ch);
            i += 2;
        } else {
            buf_putc(out, (char)tok[i]);
        }
    }
    free(tok), free(cls), free(esc);
    return ok;
}

int tool_tr(int argc, char **argv)
{
    const char *usage = "[-c] [-d] [-s] SET1 [SET2]";
    bool del = false, squeeze = false, complement = false;
    opts_t o;
    int c;
    opts_init(&o, argc, argv, "dscC", true);
    while ((c = opts_next(&o)) != 0) {
        switch (c) {
        case 'd': del = true; break;
        case 's': squeeze = true; break;
        case 'c':
        case 'C': complement = true; break;
        default: return usage_error(usage, NULL);
        }
    }
    int need = del && squeeze ? 2 : (del || squeeze ? 1 : 2);
    if (o.noperands < 1 || o.noperands > 2 || (o.noperands < need) || (del && !squeeze && o.noperands != 1))
        return usage_error(usage, o.noperands < need ? "missing operand" : "extra operand");
    buf_t s1 = {0}, s2 = {0};
    if (!tr_expand(o.operands[0], &s1) || (o.noperands > 1 && !tr_expand(o.operands[1], &s2)))
        return EXIT_ERR;
    if (complement) {
        bool in[256] = {false};
        for (size_t i = 0; i < s1.len; i++)
            in[(unsigned char)s1.data[i]] = true;
        s1.len = 0;
        for (int ch = 0; ch < 256; ch++)
            if (!in[ch])
                buf_putc(&s1, (char)ch);
    }
    bool translate = !del && o.noperands == 2;
    if (translate && s2.len == 0 && s1.len > 0)
        return usage_error(usage, "when not truncating set1, string2 must be non-empty");

    int map[256];
    bool delset[256] = {false}, sqset[256] = {false};
    for (int ch = 0; ch < 256; ch++)
        map[ch] = ch;
    for (size_t i = 0; i < s1.len; i++) {
        unsigned char ch = (unsigned char)s1.data[i];
        if (translate)
            map[ch] = (unsigned char)s2.data[i < s2.len ? i : s2.len - 1]; /* pad with SET2's last */
        if (del)
            delset[ch] = true;
    }
    /* -s squeezes the last set given: SET2 if present, else SET1 */
    buf_t *sq = o.noperands == 2 ? &s2 : &s1;
    if (squeeze)
        for (size_t i = 0; i < sq->len; i++)
            sqset[(unsigned char)sq->data[i]] = true;

    unsigned char buf[65536];
    size_t n;
    int last = -1;
    while ((n = fread(buf, 1, sizeof buf, stdin)) > 0) {
        for (size_t i = 0; i < n; i++) {
            unsigned char ch = buf[i];
            if (delset[ch])
                continue;
            int outc = map[ch];
            if (squeeze && sqset[outc] && outc == last)
                continue;
            putchar(outc);
            last = outc;
        }
    }
    buf_free(&s1);
    buf_free(&s2);
    return check_read(stdin, "-") ? EXIT_ERR : EXIT_OK;
}

/* ---- echo ------------------------------------------------------------ */

/* Prints S with echo -e escapes; returns false after "\c" (stop output). */
static bool echo_escaped(const char *s)
{
    for (; *s; s++) {
        if (*s != '\\' || !s[1]) {
            putchar(*s);
            continue;
        }
        int v;
        switch (*++s) {
        case 'n': putchar('\n'); break;
        case 't': putchar('\t'); break;
        case 'r': putchar('\r'); break;
        case 'a': putchar('\a'); break;
        case 'b': putchar('\b'); break;
        case 'f': putchar('\f'); break;
        case 'v': putchar('\v'); break;
        case 'e': putchar(27); break;
        case '\\': putchar('\\'); break;
        case 'c': return false;
        case '0':
            v = 0;
            for (int k = 0; k < 3 && s[1] >= '0' && s[1] <= '7'; k++)
                v = v * 8 + (*++s - '0');
            putchar(v & 0xff);
            break;
        case 'x':
            if (!isxdigit((unsigned char)s[1])) {
                fputs("\\x", stdout); /* "\x" without digits is printed as is */
                break;
            }
            v = 0;
            for (int k = 0; k < 2 && isxdigit((unsigned char)s[1]); k++) {
                char h = *++s;
                v = v * 16 + (isdigit((unsigned char)h) ? h - '0' : tolower((unsigned char)h) - 'a' + 10);
            }
            putchar(v);
            break;
        default:
            putchar('\\');
            putchar(*s);
        }
    }
    return true;
}

int tool_echo(int argc, char **argv)
{
    bool newline = true, escapes = false;
    int i = 1;
    /* like GNU echo: leading arguments made only of n/e/E are options */
    for (; i < argc && argv[i][0] == '-' && argv[i][1]; i++) {
        const char *p = argv[i] + 1;
        if (strspn(p, "neE") != strlen(p))
            break;
        for (; *p; p++) {
            if (*p == 'n') newline = false;
            if (*p == 'e') escapes = true;
            if (*p == 'E') escapes = false;
        }
    }
    for (int first = i; i < argc; i++) {
        if (i > first)
            putchar(' ');
        if (!escapes)
            fputs(argv[i], stdout);
        else if (!echo_escaped(argv[i]))
            return EXIT_OK;
    }
    if (newline)
        putchar('\n');
    return EXIT_OK;
}

/* ---- seq ------------------------------------------------------------- */

/* A plain decimal [-+]digits[.digits], kept exactly as a scaled integer. */
typedef struct {
    bool plain;   /* matched the plain syntax */
    int decimals; /* digits after the point */
    long double value;
} seqnum_t;

static bool seq_parse(const char *s, seqnum_t *n)
{
    char *end;
    if (!*s)
        return false;
    errno = 0;
    n->value = strtold(s, &end);
    if (*end || end == s || isnan(n->value))
        return false;
    const char *p = s + (*s == '-' || *s == '+');
    size_t id = strspn(p, "0123456789");
    const char *dot = p + id;
    n->decimals = 0;
    n->plain = false;
    if (*dot == '\0') {
        n->plain = id > 0;
    } else if (*dot == '.') {
        size_t fd = strspn(dot + 1, "0123456789");
        if (dot[1 + fd] == '\0' && id + fd > 0) {
            n->plain = true;
            n->decimals = (int)fd;
        }
    }
    return true;
}

/* Exact scaled value (value * 10^scale) if it fits in int64. */
static bool seq_scaled(const char *s, int scale, int64_t *out)
{
    bool neg = *s == '-';
    if (*s == '-' || *s == '+')
        s++;
    int64_t v = 0;
    int frac = -1;
    for (; *s; s++) {
        if (*s == '.') {
            frac = 0;
            continue;
        }
        if (frac >= 0)
            frac++;
        if (v > (INT64_MAX - 9) / 10)
            return false;
        v = v * 10 + (*s - '0');
    }
    for (int k = frac < 0 ? 0 : frac; k < scale; k++) {
        if (v > INT64_MAX / 10)
            return false;
        v *= 10;
    }
    *out = neg ? -v : v;
    return true;
}

int tool_seq(int argc, char **argv)
{
    const char *usage = "[-s SEP] [-w] [FIRST [INCR]] LAST";
    const char *sep = "\n";
    bool equal_width = false;
    int i = 1;
    /* options end at the first argument that looks like a number, so
     * "seq -5 5" works like GNU seq */
    for (; i < argc && argv[i][0] == '-' && argv[i][1] && !isdigit((unsigned char)argv[i][1]) && argv[i][1] != '.';
         i++) {
        if (strcmp(argv[i], "--") == 0) {
            i++;
            break;
        }
        if (strcmp(argv[i], "-w") == 0)
            equal_width = true;
        else if (strncmp(argv[i], "-s", 2) == 0) {
            if (argv[i][2])
                sep = argv[i] + 2;
            else if (i + 1 < argc)
                sep = argv[++i];
            else
                return usage_error(usage, "option requires an argument -- 's'");
        } else {
            return usage_error(usage, "invalid option '%s'", argv[i]);
        }
    }
    int nargs = argc - i;
    if (nargs < 1 || nargs > 3)
        return usage_error(usage, nargs < 1 ? "missing operand" : "extra operand");
    const char *sf = nargs >= 2 ? argv[i] : "1";
    const char *si = nargs == 3 ? argv[i + 1] : "1";
    const char *sl = argv[argc - 1];
    seqnum_t first, incr, last;
    const char *bad = !seq_parse(sf, &first) ? sf : !seq_parse(si, &incr) ? si : !seq_parse(sl, &last) ? sl : NULL;
    if (bad)
        return usage_error(usage, "invalid floating point argument: '%s'", bad);
    if (incr.value == 0)
        return usage_error(usage, "invalid Zero increment value: '%s'", si);

    /* output precision: the most decimals of FIRST and INCR (as GNU seq) */
    int prec = first.decimals > incr.decimals ? first.decimals : incr.decimals;
    int scale = prec > last.decimals ? prec : last.decimals;
    int64_t a, d, z;
    bool exact = first.plain && incr.plain && last.plain && scale <= 18 && seq_scaled(sf, scale, &a) &&
                 seq_scaled(si, scale, &d) && seq_scaled(sl, scale, &z);
    int width = 0;
    if (equal_width) {
        char tmp[128];
        int w1 = snprintf(tmp, sizeof tmp, "%.*Lf", prec, first.value);
        int w2 = snprintf(tmp, sizeof tmp, "%.*Lf", prec, last.value);
        width = w1 > w2 ? w1 : w2;
    }
    bool any = false;
    if (exact) {
        /* exact integer arithmetic on value * 10^scale: no float drift */
        int64_t pow = 1, div = 1;
        for (int k = 0; k < scale; k++)
            pow *= 10;
        for (int k = prec; k < scale; k++)
            div *= 10;
        for (int64_t v = a; d > 0 ? v <= z : v >= z;) {
            char num[64];
            uint64_t mag = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
            if (prec)
                snprintf(num, sizeof num, "%s%llu.%0*llu", v < 0 ? "-" : "", (unsigned long long)(mag / (uint64_t)pow),
                         prec, (unsigned long long)((mag % (uint64_t)pow) / (uint64_t)div));
            else
                snprintf(num, sizeof num, "%s%llu", v < 0 ? "-" : "", (unsigned long long)mag);
            if (any)
                fputs(sep, stdout);
            if (equal_width && (int)strlen(num) < width) {
                bool neg = num[0] == '-';
                if (neg)
                    putchar('-');
                for (int k = (int)strlen(num); k < width; k++)
                    putchar('0');
                fputs(num + neg, stdout);
            } else {
                fputs(num, stdout);
            }
            any = true;
            if (ferror(stdout))
                break;
            if ((d > 0 && v > INT64_MAX - d) || (d < 0 && v < INT64_MIN - d))
                break;
            v += d;
        }
    } else {
        /* exponents, "inf", huge values: long double like GNU seq */
        for (uint64_t k = 0;; k++) {
            long double v = first.value + (long double)k * incr.value;
            if (incr.value > 0 ? v > last.value : v < last.value)
                break;
            if (any)
                fputs(sep, stdout);
            printf("%0*.*Lf", width, prec, v);
            any = true;
            if (ferror(stdout) || k == UINT64_MAX)
                break;
        }
    }
    if (any)
        putchar('\n'); /* the terminator is always a newline */
    return EXIT_OK;
}
