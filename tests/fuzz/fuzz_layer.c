/* fuzz_layer.c - libFuzzer harness for the C layer writer (csrc/layer.c, tar.c).
 *
 * Each input is split into feed() calls of varying size (taken from the input's
 * first byte) and applied into a fresh /tmp/pycri-fuzz/dest. After every input
 * the harness aborts if anything beside dest appeared, or if the sentinel tree
 * /tmp/pycri-fuzz/outside changed: archives may aim symlinks there by absolute
 * path (the fixed path lets seeds do that), so run one fuzzing process at a time.
 * Build and run: see tests/fuzz/README.md.
 */
#include <dirent.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "pycri.h"

#define SANDBOX "/tmp/pycri-fuzz"
#define DEST SANDBOX "/dest"
#define OUTSIDE SANDBOX "/outside"
#define LOWER SANDBOX "/lower"   /* a lower layer for hardlinks this layer lacks */

static int lower_fd = -1;

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
    (void)st; (void)ftw;
    return flag == FTW_DP ? rmdir(path) : unlink(path);
}

static void rm_rf(const char *path) { nftw(path, rm_one, 64, FTW_DEPTH | FTW_PHYS); }

static void write_file(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0 || write(fd, text, strlen(text)) < 0)
        abort();
    close(fd);
}

static void check_sandbox(void) {
    /* only dest, lower and outside side by side; outside holds exactly its sentinels */
    const char *want_top[] = {"dest", "outside", "lower"}, *want_out[] = {"sentinel", "sub", "sub"};
    const char *dirs[] = {SANDBOX, OUTSIDE};
    const char **wants[] = {want_top, want_out};
    for (int d = 0; d < 2; d++) {
        DIR *dir = opendir(dirs[d]);
        struct dirent *de;
        int n = 0;
        if (!dir)
            abort();
        while ((de = readdir(dir))) {
            if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
                continue;
            if (strcmp(de->d_name, wants[d][0]) && strcmp(de->d_name, wants[d][1]) &&
                strcmp(de->d_name, wants[d][2])) {
                fprintf(stderr, "escape: %s/%s appeared\n", dirs[d], de->d_name);
                abort();
            }
            n++;
        }
        closedir(dir);
        if (n != (d == 0 ? 3 : 2))
            abort();
    }
    struct stat st;
    char buf[32] = {0};
    int fd = open(OUTSIDE "/sentinel", O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0 || fstat(fd, &st) < 0 || read(fd, buf, sizeof(buf) - 1) != 8 ||
        strcmp(buf, "sentinel") || (st.st_mode & 07777) != 0640 || st.st_uid != 0 ||
        st.st_mtime != 1000000000) {
        fprintf(stderr, "escape: the sentinel file changed\n");
        abort();
    }
    close(fd);
    if (lstat(OUTSIDE "/sub", &st) < 0 || !S_ISDIR(st.st_mode) || (st.st_mode & 07777) != 0755)
        abort();
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc; (void)argv;
    rm_rf(SANDBOX);
    if (mkdir(SANDBOX, 0755) < 0 || mkdir(OUTSIDE, 0755) < 0 || mkdir(OUTSIDE "/sub", 0755) < 0)
        abort();
    chmod(OUTSIDE "/sub", 0755);
    write_file(OUTSIDE "/sentinel", "sentinel");
    chmod(OUTSIDE "/sentinel", 0640);
    struct timespec ts[2] = {{1000000000, 0}, {1000000000, 0}};
    utimensat(AT_FDCWD, OUTSIDE "/sentinel", ts, 0);
    if (mkdir(LOWER, 0755) < 0 || mkdir(LOWER "/usr", 0755) < 0)
        abort();
    write_file(LOWER "/usr/big", "lower file");
    symlink(OUTSIDE, LOWER "/esc");
    mknod(LOWER "/usr/gone", S_IFCHR, 0);
    lower_fd = open(LOWER, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    return lower_fd < 0 ? -1 : 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    struct pycri_layer l;
    struct pycri_error err;
    struct pycri_layer_limits lim = {.max_entries = 2000, .max_bytes = 64 << 20,
                                     .max_meta_size = 1 << 16};
    char hex[65];
    size_t step = size ? (size_t)data[0] * 7 + 1 : 1; /* 1..1786-byte feeds */

    if (mkdir(DEST, 0755) < 0)
        abort();
    if (pycri_layer_open(&l, AT_FDCWD, DEST, &lim, &lower_fd, 1, 0, &err) == 0) {
        int rc = 0;
        for (size_t off = 0; rc == 0 && off < size; off += step)
            rc = pycri_layer_feed(&l, data + off, size - off < step ? size - off : step, &err);
        if (rc == 0)
            pycri_layer_finish(&l, hex, &err);
    }
    pycri_layer_close(&l);
    pycri_layer_close(&l); /* idempotent */
    check_sandbox();
    rm_rf(DEST);
    return 0;
}
