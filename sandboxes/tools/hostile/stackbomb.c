/* Unbounded recursion with a 4 KiB local array in every frame, so both
 * the shadow stack in linear memory and the wasm call stack run out. */
#include <stdio.h>

__attribute__((noinline)) static int recurse(int depth)
{
    volatile char frame[4096];
    frame[depth % 4096] = (char)depth;
    /* use the result so the call can't become a loop */
    return recurse(depth + 1) + frame[(depth * 7) % 4096];
}

int main(void)
{
    return recurse(0);
}
