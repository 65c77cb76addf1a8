/* Allocates 1 MiB chunks forever, touching every page so the memory is
 * really committed.  Prints nothing.  If malloc ever fails (the host's
 * memory limit refused memory.grow) it exits with status 3. */
#include <stdlib.h>

int main(void)
{
    for (;;) {
        volatile char *p = malloc(1 << 20);
        if (!p)
            return 3;
        for (int i = 0; i < (1 << 20); i += 4096)
            p[i] = (char)i;
    }
}
