/* Fault injection for the durability tests (engine/dynauthd/tests/durability.rs): an
 * LD_PRELOAD object that makes fdatasync(2) fail with EIO, the way a failing disk does,
 * without device-mapper or root. Built by the test with the system C compiler.
 *
 *   DYNAUTH_FAULT_FDATASYNC_PATH   a substring of the file's path (e.g. "journal-"): only
 *                                  fdatasync calls on such files count and can fail
 *   DYNAUTH_FAULT_FDATASYNC_AFTER  that many of those calls succeed, every later one fails
 *
 * Every other call goes straight to the kernel. Never used outside the tests. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static int matching_calls;

int fdatasync(int fd) {
    const char *pattern = getenv("DYNAUTH_FAULT_FDATASYNC_PATH");
    const char *after = getenv("DYNAUTH_FAULT_FDATASYNC_AFTER");
    if (pattern != NULL && after != NULL) {
        char link[64];
        char path[4096];
        snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
        ssize_t n = readlink(link, path, sizeof path - 1);
        if (n > 0) {
            path[n] = '\0';
            if (strstr(path, pattern) != NULL &&
                __atomic_add_fetch(&matching_calls, 1, __ATOMIC_SEQ_CST) > atoi(after)) {
                errno = EIO;
                return -1;
            }
        }
    }
    return (int)syscall(SYS_fdatasync, fd);
}
