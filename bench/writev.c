/* What one small write costs over loopback TCP, as writev(2) with two buffers (a response head
 * and a short body, as hyper hands them over), writev with one, write(2) and send(2) of the same
 * 200 bytes: the measurement behind sidecar/src/net.rs (Coalesced). Run through
 * bench/writev.sh. Each variant times N calls, ten rounds interleaved; the reader drains every
 * 50 calls so the socket never fills. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 20000;
    int l = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (bind(l, (void *)&a, sizeof a) || listen(l, 1) || getsockname(l, (void *)&a, &len)) return perror("listen"), 1;
    int c = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(c, (void *)&a, sizeof a)) return perror("connect"), 1;
    int s = accept(l, 0, 0), one = 1;
    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    static char head[150], body[50], flat[200], sink[1 << 20];
    memset(head, 'h', sizeof head);
    memset(body, 'b', sizeof body);
    const char *names[] = {"writev, 2 buffers", "writev, 1 buffer", "write", "send"};
    double total[4] = {0};
    for (int round = 0; round < 10; round++)
        for (int v = 0; v < 4; v++) {
            for (int i = 0; i < n; i++) {
                struct iovec two[2] = {{head, 150}, {body, 50}}, whole[1] = {{flat, 200}};
                double t0 = now();
                ssize_t w = v == 0 ? writev(c, two, 2)
                          : v == 1 ? writev(c, whole, 1)
                          : v == 2 ? write(c, (memcpy(flat, head, 150), memcpy(flat + 150, body, 50), flat), 200)
                                   : send(c, (memcpy(flat, head, 150), memcpy(flat + 150, body, 50), flat), 200, MSG_NOSIGNAL);
                total[v] += now() - t0;
                if (w != 200) return fprintf(stderr, "short write\n"), 1;
                if (i % 50 == 49)
                    for (int got = 0; got < 50 * 200;) got += recv(s, sink, sizeof sink, 0);
            }
        }
    for (int v = 0; v < 4; v++) printf("%-18s %5.0f ns per 200-byte call\n", names[v], total[v] * 1e9 / n / 10);
    return 0;
}
