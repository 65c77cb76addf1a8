/* Smoke test: prints "hello", then one line "argv[I]=ARG" per argument
 * (argv[0] included), then copies stdin to stdout unchanged. */
#include <stdio.h>

int main(int argc, char **argv)
{
    printf("hello\n");
    for (int i = 0; i < argc; i++)
        printf("argv[%d]=%s\n", i, argv[i]);
    char buf[65536];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, stdin)) > 0)
        fwrite(buf, 1, n, stdout);
    return ferror(stdin) || fflush(stdout) != 0 ? 1 : 0;
}
