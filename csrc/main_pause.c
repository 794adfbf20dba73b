/* main_pause.c - pycri-pause: pid 1 of a pod whose containers share a pid namespace.
 *
 * It holds the namespace open while containers come and go, and reaps the
 * processes that get re-parented to it. SIGTERM/SIGINT end it. Nothing else.
 */
#include <errno.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile sig_atomic_t done;

static void on_term(int sig) { (void)sig; done = 1; }
static void on_chld(int sig) { (void)sig; }

int main(void) {
    struct sigaction sa = {0};
    sa.sa_handler = on_term;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sa.sa_handler = on_chld;
    sa.sa_flags = SA_NOCLDSTOP;
    sigaction(SIGCHLD, &sa, NULL);
    while (!done) {
        pause();
        while (waitpid(-1, NULL, WNOHANG) > 0)
            ;
    }
    return 0;
}
