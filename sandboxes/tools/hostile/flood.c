/* Writes to stdout forever (64 KiB at a time); exits 3 once a write
 * fails, e.g. when the host stops accepting output. */
#include <string.h>
#include <unistd.h>

int main(void)
{
    static char buf[65536];
    for (size_t i = 0; i < sizeof buf; i += 2)
        memcpy(buf + i, "y\n", 2);
    for (;;)
        if (write(1, buf, sizeof buf) < 0)
            return 3;
}
