/* probe.c - what a process sees, printed as one JSON object on stdout.
 *
 * Built with `gcc -static` by tests/test_spawn.py and run inside containers.
 * Extra arguments are checks: "r:PATH" opens PATH read-only, "w:PATH" creates
 * PATH for writing, "d:PATH" makes a directory; each reports 0 or the errno.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

static void jstr(const char *s) {
    putchar('"');
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            printf("\\%c", c);
        else if (c < 0x20)
            printf("\\u%04x", c);
        else
            putchar(c);
    }
    putchar('"');
}

static void status_field(const char *name) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    size_t n = strlen(name);
    while (f && fgets(line, sizeof(line), f)) {
        if (strncmp(line, name, n) == 0 && line[n] == ':') {
            char *v = line + n + 1;
            while (*v == ' ' || *v == '\t')
                v++;
            v[strcspn(v, "\n")] = 0;
            jstr(v);
            fclose(f);
            return;
        }
    }
    if (f)
        fclose(f);
    printf("null");
}

int main(int argc, char **argv) {
    uid_t ru, eu, su;
    gid_t rg, eg, sg;
    getresuid(&ru, &eu, &su);
    getresgid(&rg, &eg, &sg);
    printf("{\"pid\": %d, \"ppid\": %d", getpid(), getppid());
    printf(", \"uid\": [%u, %u, %u], \"gid\": [%u, %u, %u]", ru, eu, su, rg, eg, sg);
    gid_t groups[256];
    int ng = getgroups(256, groups);
    printf(", \"groups\": [");
    for (int i = 0; i < ng; i++)
        printf("%s%u", i ? ", " : "", groups[i]);
    printf("]");
    const char *caps[] = {"CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "Seccomp", "NoNewPrivs"};
    for (size_t i = 0; i < sizeof(caps) / sizeof(caps[0]); i++) {
        printf(", \"%s\": ", caps[i]);
        status_field(caps[i]);
    }
    printf(", \"no_new_privs\": %d", prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0));
    printf(", \"seccomp\": %d", prctl(PR_GET_SECCOMP, 0, 0, 0, 0));
    printf(", \"dumpable\": %d", prctl(PR_GET_DUMPABLE, 0, 0, 0, 0));
    char host[256] = "";
    gethostname(host, sizeof(host));
    printf(", \"hostname\": ");
    jstr(host);
    const char *ns[] = {"user", "mnt", "pid", "uts", "ipc", "net", "cgroup"};
    printf(", \"ns\": {");
    for (size_t i = 0; i < 7; i++) {
        char p[64];
        struct stat st;
        snprintf(p, sizeof(p), "/proc/self/ns/%s", ns[i]);
        printf("%s\"%s\": %llu", i ? ", " : "", ns[i],
               stat(p, &st) == 0 ? (unsigned long long)st.st_ino : 0ULL);
    }
    printf("}");
    printf(", \"fds\": [");
    DIR *d = opendir("/proc/self/fd");
    int first = 1;
    struct dirent *e;
    while (d && (e = readdir(d))) {
        if (e->d_name[0] == '.' || atoi(e->d_name) == dirfd(d))
            continue;
        printf("%s%s", first ? "" : ", ", e->d_name);
        first = 0;
    }
    if (d)
        closedir(d);
    printf("]");
    char cwd[4096];
    printf(", \"cwd\": ");
    jstr(getcwd(cwd, sizeof(cwd)) ? cwd : "");
    printf(", \"rlimits\": {");
    for (int r = 0; r < RLIM_NLIMITS; r++) {
        struct rlimit rl;
        getrlimit(r, &rl);
        printf("%s\"%d\": [%lld, %lld]", r ? ", " : "", r,
               rl.rlim_cur == RLIM_INFINITY ? -1LL : (long long)rl.rlim_cur,
               rl.rlim_max == RLIM_INFINITY ? -1LL : (long long)rl.rlim_max);
    }
    printf("}");
    char buf[64] = "";
    int fd = open("/proc/self/oom_score_adj", O_RDONLY);
    if (fd >= 0) {
        ssize_t n = read(fd, buf, sizeof(buf) - 1);
        buf[n > 0 ? n : 0] = 0;
        close(fd);
    }
    printf(", \"oom_score_adj\": %d", atoi(buf));
    printf(", \"mounts\": [");
    FILE *f = fopen("/proc/self/mountinfo", "r");
    char line[4096];
    first = 1;
    while (f && fgets(line, sizeof(line), f)) {
        line[strcspn(line, "\n")] = 0;
        printf("%s", first ? "" : ", ");
        jstr(line);
        first = 0;
    }
    if (f)
        fclose(f);
    printf("]");
    printf(", \"checks\": {");
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int rc = -1;
        if (strncmp(a, "r:", 2) == 0)
            rc = open(a + 2, O_RDONLY);
        else if (strncmp(a, "w:", 2) == 0)
            rc = open(a + 2, O_WRONLY | O_CREAT, 0644);
        else if (strncmp(a, "d:", 2) == 0)
            rc = mkdir(a + 2, 0755);
        else
            errno = EINVAL;
        int res = rc >= 0 ? 0 : errno;
        if (rc > 0)
            close(rc);
        printf("%s", i > 1 ? ", " : "");
        jstr(a);
        printf(": %d", res);
    }
    printf("}}\n");
    return 0;
}
