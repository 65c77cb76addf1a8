/* Creates f0, f1, ... (1 byte each) forever; exits 3 when a create or
 * write fails (the host's file-count or disk quota). */
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

int main(void)
{
    char name[32];
    for (unsigned long long i = 0;; i++) {
        snprintf(name, sizeof name, "f%llu", i);
        int fd = open(name, O_WRONLY | O_CREAT | O_TRUNC, 0666);
        if (fd < 0)
            return 3;
        if (write(fd, "x", 1) != 1) {
            close(fd);
            return 3;
        }
        close(fd);
    }
}
