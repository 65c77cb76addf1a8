/* Burns CPU forever without a single host call: only fuel/epoch
 * interruption can stop it. */
int main(void)
{
    volatile unsigned long long counter = 0;
    for (;;)
        counter++;
}
