/* Appends 64 KiB blocks to big.bin forever; exits 3 when a write (or the
 * open) fails, e.g. at the host's disk quota. */
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

int main(void)
{
    static char block[65536];
    memset(block, 'D', sizeof block);
    int fd = open("big.bin", O_WRONLY | O_CREAT | O_TRUNC, 0666);
    if (fd < 0)
        return 3;
    for (;;) {
        ssize_t w = write(fd, block, sizeof block);
        if (w != (ssize_t)sizeof block)
            return 3; /* error, or a short write at the quota */
    }
}
