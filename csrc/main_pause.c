/* main_pause.c - pycri-pause: pid 1 of a pod whose containers share a pid namespace.
 *
 * It holds the namespace open while containers come and go, and reaps the
 * processes that get re-parented to it. SIGTERM/SIGINT end it. Nothing else.
 */
#include <errno.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile sig_atomic_t done;

static void on_term(int sig) { (void)sig; done = 1; }
static void on_chld(int sig) { (void)sig; }

int main(void) {
    /* exec'd through /proc/self/fd/N (see sandbox.py), which names the process
     * "N"; ps should say what it is. Nothing else of the caller's is kept open. */
    prctl(PR_SET_NAME, "pycri-pause", 0, 0, 0);
    close(3);
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
