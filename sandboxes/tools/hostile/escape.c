/* Tries to reach files outside the preopened episode directory.  Every
 * attempt prints one line: "NAME: refused (strerror)" or "NAME: OPENED"
 * (for the symlink creation: "NAME: CREATED").  Always exits 0; the test
 * asserts on the lines. */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static void try_open(const char *name)
{
    int fd = open(name, O_RDONLY);
    if (fd < 0) {
        printf("%s: refused (%s)\n", name, strerror(errno));
    } else {
        printf("%s: OPENED\n", name);
        close(fd);
    }
}

int main(void)
{
    try_open("../outside.txt");
    try_open("/etc/passwd");
    try_open("link_out"); /* the test makes it point outside the directory */
    if (symlink("/etc", "evil") != 0)
        printf("evil -> /etc: refused (%s)\n", strerror(errno));
    else
        printf("evil -> /etc: CREATED\n");
    try_open("evil/passwd");
    return 0;
}
