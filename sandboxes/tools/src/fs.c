/* File-system tools: ls mkdir cp mv rm touch.
 * Symbolic links are never followed while recursing (lstat), so a link
 * planted in the episode directory can't drag a tool outside it; the
 * host refuses such escapes too, this just keeps behaviour predictable. */
#include "common.h"

#include <fcntl.h>
#include <unistd.h>

/* ---- ls -------------------------------------------------------------- */

typedef struct {
    bool longfmt, all, recursive;
    int printed; /* sections printed so far: blank lines between them */
} ls_t;

static char type_char(mode_t m)
{
    if (S_ISDIR(m)) return 'd';
    if (S_ISLNK(m)) return 'l';
    if (S_ISREG(m)) return '-';
    if (S_ISCHR(m)) return 'c';
    if (S_ISBLK(m)) return 'b';
    if (S_ISFIFO(m)) return 'p';
    if (S_ISSOCK(m)) return 's';
    return '?';
}

/* One entry: NAME as shown, PATH to stat. */
static int ls_entry(const ls_t *ls, const char *path, const char *name)
{
    if (!ls->longfmt) {
        printf("%s\n", name);
        return 0;
    }
    struct stat st;
    if (lstat(path, &st) != 0) {
        err_path(path, errno);
        return 1;
    }
    /* a directory's st_size depends on the host file system, so it is
     * shown as "-" to keep listings identical everywhere */
    if (S_ISDIR(st.st_mode))
        printf("%c %10s %s", type_char(st.st_mode), "-", name);
    else
        printf("%c %10lld %s", type_char(st.st_mode), (long long)st.st_size, name);
    if (S_ISDIR(st.st_mode) && strcmp(name, "/") != 0 && name[strlen(name) - 1] != '/')
        putchar('/');
    if (S_ISLNK(st.st_mode)) {
        char target[4096];
        ssize_t n = readlink(path, target, sizeof target - 1);
        if (n >= 0) {
            target[n] = '\0';
            printf(" -> %s", target);
        }
    }
    putchar('\n');
    return 0;
}

static int ls_dir(ls_t *ls, const char *path, bool header)
{
    size_t n;
    char **names = list_dir(path, &n);
    if (!names) {
        err_path(path, errno);
        return 1;
    }
    int status = 0;
    if (header)
        printf("%s%s:\n", ls->printed++ ? "\n" : "", path);
    else
        ls->printed++;
    if (ls->all) {
        char *dot = path_join(path, "."), *dotdot = path_join(path, "..");
        status |= ls_entry(ls, dot, ".");
        status |= ls_entry(ls, dotdot, "..");
        free(dot);
        free(dotdot);
    }
    for (size_t i = 0; i < n; i++) {
        if (!ls->all && names[i][0] == '.')
            continue;
        char *p = path_join(path, names[i]);
        status |= ls_entry(ls, p, names[i]);
        free(p);
    }
    if (ls->recursive) {
        for (size_t i = 0; i < n; i++) {
            if (!ls->all && names[i][0] == '.')
                continue;
            char *p = path_join(path, names[i]);
            struct stat st;
            if (lstat(p, &st) == 0 && S_ISDIR(st.st_mode))
                status |= ls_dir(ls, p, true);
            free(p);
        }
    }
    free_names(names, n);
    return status;
}

int tool_ls(int argc, char **argv)
{
    ls_t ls = {0};
    opts_t o;
    int c;
    opts_init(&o, argc, argv, "laA1R", true);
    while ((c = opts_next(&o)) != 0) {
        switch (c) {
        case 'l': ls.longfmt = true; break;
        case 'a':
        case 'A': ls.all = true; break;
        case '1': break; /* always one per line */
        case 'R': ls.recursive = true; break;
        default: return usage_error("[-l] [-a] [-1] [-R] [PATH...]", NULL);
        }
    }
    static char *dot[] = {".", NULL};
    char **paths = o.noperands ? o.operands : dot;
    int np = o.noperands ? o.noperands : 1;
    int status = 0;
    /* GNU order: plain files first, then each directory with a header
     * when there is more than one operand (or -R). */
    bool *isdir = xmalloc((size_t)np * sizeof *isdir);
    for (int i = 0; i < np; i++) {
        struct stat st;
        isdir[i] = false;
        if (stat(paths[i], &st) != 0 && lstat(paths[i], &st) != 0) {
            err_path(paths[i], errno);
            status = 1;
            paths[i] = NULL;
            continue;
        }
        if (S_ISDIR(st.st_mode))
            isdir[i] = true;
    }
    /* operands are shown in sorted order, files before directories */
    for (int i = 1; i < np; i++)
        for (int j = i; j > 0 && paths[j] && (!paths[j - 1] || strcmp(paths[j - 1], paths[j]) > 0); j--) {
            char *t = paths[j]; paths[j] = paths[j - 1]; paths[j - 1] = t;
            bool b = isdir[j]; isdir[j] = isdir[j - 1]; isdir[j - 1] = b;
        }
    for (int i = 0; i < np; i++)
        if (paths[i] && !isdir[i]) {
            status |= ls_entry(&ls, paths[i], paths[i]);
            ls.printed = 1;
        }
    bool headers = np > 1 || ls.recursive;
    for (int i = 0; i < np; i++)
        if (paths[i] && isdir[i])
            status |= ls_dir(&ls, paths[i], headers);
    free(isdir);
    return status ? EXIT_ERR : EXIT_OK;
}

/* ---- mkdir ----------------------------------------------------------- */

int tool_mkdir(int argc, char **argv)
{
    const char *usage = "[-p] DIR...";
    bool parents = false;
    opts_t o;
    int c;
    opts_init(&o, argc, argv, "pv", true);
    while ((c = opts_next(&o)) != 0) {
        if (c == 'p')
            parents = true;
        else if (c != 'v')
            return usage_error(usage, NULL);
    }
    if (o.noperands == 0)
        return usage_error(usage, "missing operand");
    int status = EXIT_OK;
    for (int i = 0; i < o.noperands; i++) {
        const char *d = o.operands[i];
        if (parents) {
            char *failed = NULL;
            int e = make_dirs(d, &failed);
            if (e) {
                err_path(failed, e);
                free(failed);
                status = EXIT_ERR;
            }
        } else {
            char *clean = strip_slashes(d);
            if (mkdir(clean, 0777) != 0) {
                err_path(d, errno);
                status = EXIT_ERR;
            }
            free(clean);
        }
    }
    return status;
}

/* ---- cp -------------------------------------------------------------- */

static int copy_file(const char *src, const char *dst)
{
    /* "cp f f" must not truncate f before reading it */
    struct stat ss, ds;
    if (stat(src, &ss) == 0 && stat(dst, &ds) == 0 && ss.st_dev == ds.st_dev && ss.st_ino == ds.st_ino) {
        err_msg("'%s' and '%s' are the same file", src, dst);
        return 1;
    }
    int in = open(src, O_RDONLY);
    if (in < 0) {
        err_path(src, errno);
        return 1;
    }
    int out = open(dst, O_WRONLY | O_CREAT | O_TRUNC, 0666);
    if (out < 0) {
        err_path(dst, errno);
        close(in);
        return 1;
    }
    char buf[65536];
    int status = 0;
    for (;;) {
        ssize_t n = read(in, buf, sizeof buf);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            err_path(src, errno);
            status = 1;
            break;
        }
        if (n == 0)
            break;
        for (ssize_t off = 0; off < n;) {
            ssize_t w = write(out, buf + off, (size_t)(n - off));
            if (w < 0) {
                if (errno == EINTR)
                    continue;
                err_path(dst, errno);
                status = 1;
                goto done;
            }
            off += w;
        }
    }
done:
    close(in);
    if (close(out) != 0 && !status) {
        err_path(dst, errno);
        status = 1;
    }
    return status;
}

static int copy_tree(const char *src, const char *dst, bool recursive)
{
    struct stat st;
    if (lstat(src, &st) != 0) {
        err_path(src, errno);
        return 1;
    }
    if (S_ISLNK(st.st_mode)) {
        /* copy the link itself (cp -P); never follow it */
        char target[4096];
        ssize_t n = readlink(src, target, sizeof target - 1);
        if (n < 0) {
            err_path(src, errno);
            return 1;
        }
        target[n] = '\0';
        unlink(dst);
        if (symlink(target, dst) != 0) {
            err_path(dst, errno);
            return 1;
        }
        return 0;
    }
    if (!S_ISDIR(st.st_mode))
        return copy_file(src, dst);
    if (!recursive) {
        err_msg("%s: -r not specified; omitting directory", src);
        return 1;
    }
    if (mkdir(dst, 0777) != 0 && errno != EEXIST) {
        err_path(dst, errno);
        return 1;
    }
    size_t n;
    char **names = list_dir(src, &n);
    if (!names) {
        err_path(src, errno);
        return 1;
    }
    int status = 0;
    for (size_t i = 0; i < n; i++) {
        char *s = path_join(src, names[i]), *d = path_join(dst, names[i]);
        status |= copy_tree(s, d, true);
        free(s);
        free(d);
    }
    free_names(names, n);
    return status;
}

static bool is_dir(const char *p)
{
    struct stat st;
    return stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

/* Normalises "a/b/" and "a/./" style paths for the "into itself" check. */
static bool is_inside(const char *dst, const char *src)
{
    size_t n = strlen(src);
    while (n > 1 && src[n - 1] == '/')
        n--;
    return strncmp(dst, src, n) == 0 && (dst[n] == '\0' || dst[n] == '/');
}

/* Shared by cp and mv: SRC... DST, where DST must be a directory when
 * there are several sources. */
static int copy_or_move(int argc, char **argv, bool move)
{
    const char *usage = move ? "[-f] SRC... DST" : "[-r] SRC... DST";
    bool recursive = false;
    opts_t o;
    int c;
    opts_init(&o, argc, argv, move ? "fnv" : "rRfpPav", true);
    while ((c = opts_next(&o)) != 0) {
        if (c == 'r' || c == 'R' || c == 'a')
            recursive = true;
        else if (c == '?')
            return usage_error(usage, NULL);
    }
    if (o.noperands < 2)
        return usage_error(usage, o.noperands ? "missing destination operand after '%s'" : "missing file operand",
                           o.noperands ? o.operands[0] : "");
    const char *dst = o.operands[o.noperands - 1];
    bool into = is_dir(dst);
    if (o.noperands > 2 && !into) {
        err_msg("target '%s' is not a directory", dst);
        return EXIT_ERR;
    }
    int status = 0;
    for (int i = 0; i < o.noperands - 1; i++) {
        char *src = strip_slashes(o.operands[i]);
        char *target = into ? path_join(dst, base_name(src)) : strip_slashes(dst);
        struct stat ss;
        if (lstat(src, &ss) != 0) {
            err_path(src, errno);
            status = 1;
        } else if (S_ISDIR(ss.st_mode) && is_inside(target, src)) {
            err_msg("cannot %s '%s' to a subdirectory of itself, '%s'", move ? "move" : "copy", src, target);
            status = 1;
        } else if (move) {
            if (rename(src, target) != 0) {
                err_path(src, errno);
                status = 1;
            }
        } else {
            status |= copy_tree(src, target, recursive);
        }
        free(target);
        free(src);
    }
    return status ? EXIT_ERR : EXIT_OK;
}

int tool_cp(int argc, char **argv) { return copy_or_move(argc, argv, false); }
int tool_mv(int argc, char **argv) { return copy_or_move(argc, argv, true); }

/* ---- rm -------------------------------------------------------------- */

static int remove_tree(const char *path, bool recursive, bool force)
{
    struct stat st;
    if (lstat(path, &st) != 0) {
        if (force && errno == ENOENT)
            return 0;
        err_path(path, errno);
        return 1;
    }
    if (!S_ISDIR(st.st_mode)) {
        if (unlink(path) != 0) {
            err_path(path, errno);
            return 1;
        }
        return 0;
    }
    if (!recursive) {
        err_path(path, EISDIR);
        return 1;
    }
    size_t n;
    char **names = list_dir(path, &n);
    if (!names) {
        err_path(path, errno);
        return 1;
    }
    int status = 0;
    for (size_t i = 0; i < n; i++) {
        char *p = path_join(path, names[i]);
        status |= remove_tree(p, true, force);
        free(p);
    }
    free_names(names, n);
    if (rmdir(path) != 0) {
        err_path(path, errno);
        status = 1;
    }
    return status;
}

int tool_rm(int argc, char **argv)
{
    const char *usage = "[-r] [-f] PATH...";
    bool recursive = false, force = false;
    opts_t o;
    int c;
    opts_init(&o, argc, argv, "rRfdv", true);
    while ((c = opts_next(&o)) != 0) {
        if (c == 'r' || c == 'R')
            recursive = true;
        else if (c == 'f')
            force = true;
        else if (c == '?')
            return usage_error(usage, NULL);
    }
    if (o.noperands == 0)
        return force ? EXIT_OK : usage_error(usage, "missing operand");
    int status = 0;
    for (int i = 0; i < o.noperands; i++) {
        const char *p = o.operands[i];
        const char *b = base_name(p);
        /* like GNU rm: never remove "." or ".." (rm -rf . would wipe the
         * whole episode directory) */
        if (strcmp(b, ".") == 0 || strcmp(b, "..") == 0 || strncmp(b, "./", 2) == 0 ||
            strncmp(b, "../", 3) == 0 || strcmp(p, "/") == 0) {
            err_msg("refusing to remove '.' or '..' directory: skipping '%s'", p);
            status = 1;
            continue;
        }
        char *clean = strip_slashes(p);
        status |= remove_tree(clean, recursive, force);
        free(clean);
    }
    return status ? EXIT_ERR : EXIT_OK;
}

/* ---- touch ----------------------------------------------------------- */

int tool_touch(int argc, char **argv)
{
    const char *usage = "[-c] FILE...";
    bool no_create = false;
    opts_t o;
    int c;
    opts_init(&o, argc, argv, "cam", true);
    while ((c = opts_next(&o)) != 0) {
        if (c == 'c')
            no_create = true;
        else if (c == '?')
            return usage_error(usage, NULL);
    }
    if (o.noperands == 0)
        return usage_error(usage, "missing file operand");
    int status = EXIT_OK;
    for (int i = 0; i < o.noperands; i++) {
        const char *p = o.operands[i];
        struct stat st;
        bool exists = stat(p, &st) == 0;
        if (!exists && no_create)
            continue;
        if (!exists) {
            int fd = open(p, O_WRONLY | O_CREAT, 0666);
            if (fd < 0) {
                err_path(p, errno);
                status = EXIT_ERR;
                continue;
            }
            close(fd);
        }
        /* set both times to now (also for directories) */
        if (utimensat(AT_FDCWD, p, NULL, 0) != 0) {
            err_path(p, errno);
            status = EXIT_ERR;
        }
    }
    return status;
}
