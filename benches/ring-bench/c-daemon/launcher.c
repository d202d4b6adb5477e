// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//
// ring-bench's entry point for hvisor-tool's virtio daemon: what `hvisor virtio start CONFIG`
// does, linked against the daemon's own sources (tools/virtio, tools/log.c, ...) without the
// zone-management half of hvisor-tool's CLI (tools/hvisor.c: zone start, image loading), which
// the daemon does not use and which does not build for x86_64 from the stored sources.
//
// The daemon's code is not changed: this file only supplies main() and read_file(), the two
// things tools/virtio/virtio.c takes from tools/hvisor.c.

#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "log.h"
#include "virtio.h"

// The whole of `filename`, with one spare byte after it for the terminating NUL that
// virtio_start_from_json writes at buffer[file_size]. Exits on failure, as hvisor-tool's does.
void *read_file(const char *filename, uint64_t *filesize) {
    int fd = open(filename, O_RDONLY);
    if (fd < 0) {
        perror(filename);
        exit(1);
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        perror(filename);
        exit(1);
    }
    char *buffer = calloc(1, (size_t)st.st_size + 1);
    if (!buffer) {
        perror("read_file");
        exit(1);
    }
    ssize_t done = 0;
    while (done < st.st_size) {
        ssize_t got = read(fd, buffer + done, (size_t)(st.st_size - done));
        if (got <= 0) {
            perror(filename);
            exit(1);
        }
        done += got;
    }
    close(fd);
    if (filesize)
        *filesize = (uint64_t)done;
    return buffer;
}

int main(int argc, char *argv[]) {
    if (argc != 4 || strcmp(argv[1], "virtio") != 0 ||
        strcmp(argv[2], "start") != 0) {
        fprintf(stderr, "usage: %s virtio start <virtio_cfg.json>\n", argv[0]);
        return 2;
    }
    // As hvisor-tool's main: its log goes to syslog.
    multithread_log_init();
    initialize_log();
    atexit(multithread_log_exit);
    return virtio_start(argc, argv) ? 1 : 0;
}
