/* The floor: the least a server can do to hold N streaming connections.
 *
 * One thread, one epoll set. It accepts, answers each request with a response
 * head, drains (and ignores) what clients send, closes on EOF, and every
 * heartbeat writes "BEEP\n" to every connection with one non-blocking send()
 * each: no buffering, no per-connection object beyond an fd table entry. It
 * prints the same round line as wsgi_hijack's reactor, so the benchmark reads
 * both the same way.
 *
 * Built at benchmark time (never committed as a binary):
 *     gcc -O2 -o floor floor.c [-lpthread]
 * Run: floor PORT HEARTBEAT_SECONDS [THREADS]
 * THREADS > 1 spreads each round's sends over that many OS threads.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static const char HEAD[] = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                           "Cache-Control: no-cache\r\nConnection: close\r\n\r\n";
static const char BEAT[] = "BEEP\n";
static char *state;            /* per fd: 0 free, 1 waiting for request, 2 streaming */
static int *live;              /* streaming fds, packed, for the send loop */
static int nlive, maxfd;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

struct slice { int from, to; long failed; };

static void *send_slice(void *arg) {
    struct slice *s = arg;
    for (int i = s->from; i < s->to; i++)
        if (send(live[i], BEAT, sizeof BEAT - 1, MSG_DONTWAIT | MSG_NOSIGNAL) < 0) s->failed++;
    return NULL;
}

static void round_(int threads) {
    double t0 = now();
    struct slice sl[64];
    pthread_t th[64];
    if (threads > 64) threads = 64;
    for (int t = 0; t < threads; t++) {
        sl[t].from = (int)((long)nlive * t / threads);
        sl[t].to = (int)((long)nlive * (t + 1) / threads);
        sl[t].failed = 0;
        if (t) pthread_create(&th[t], NULL, send_slice, &sl[t]);
    }
    send_slice(&sl[0]);
    for (int t = 1; t < threads; t++) pthread_join(th[t], NULL);
    double el = now() - t0;
    fprintf(stderr, "Number of clients connected: %d, time for entire write run: %.6f s\n",
            nlive, el);
}

static void close_fd(int ep, int fd) {
    if (state[fd] == 2)
        for (int i = 0; i < nlive; i++)
            if (live[i] == fd) { live[i] = live[--nlive]; break; }
    state[fd] = 0;
    epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
    close(fd);
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: floor PORT HEARTBEAT [THREADS]\n"); return 2; }
    int port = atoi(argv[1]);
    double hb = atof(argv[2]);
    int threads = argc > 3 ? atoi(argv[3]) : 1;
    if (threads < 1) threads = 1;
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    maxfd = (int)rl.rlim_cur + 1;
    state = calloc(maxfd, 1);
    live = calloc(maxfd, sizeof *live);

    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    /* FLOOR_NODELAY=1: TCP_NODELAY on every connection, as gunicorn sets it. */
    if (getenv("FLOOR_NODELAY")) setsockopt(ls, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 4096)) { perror("listen"); return 1; }
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = ls};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    fprintf(stderr, "floor listening on 127.0.0.1:%d, heartbeat %.3g s, %d thread(s)\n",
            port, hb, threads);
    struct epoll_event evs[4096];
    char buf[65536];
    double next = now() + hb;
    for (;;) {
        int timeout = (int)((next - now()) * 1000);
        int n = epoll_wait(ep, evs, 4096, timeout < 0 ? 0 : timeout);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == ls) {
                for (;;) {
                    int c = accept4(ls, NULL, NULL, SOCK_NONBLOCK);
                    if (c < 0) break;
                    if (c >= maxfd) { close(c); continue; }
                    state[c] = 1;
                    struct epoll_event ce = {.events = EPOLLIN | EPOLLRDHUP, .data.fd = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &ce);
                }
                continue;
            }
            ssize_t r = read(fd, buf, sizeof buf);
            if (r == 0 || (r < 0 && errno != EAGAIN)) { close_fd(ep, fd); continue; }
            if (r > 0 && state[fd] == 1 && memmem(buf, r, "\r\n\r\n", 4)) {
                if (send(fd, HEAD, sizeof HEAD - 1, MSG_NOSIGNAL) < 0) { close_fd(ep, fd); continue; }
                state[fd] = 2;
                live[nlive++] = fd;
            }
        }
        double t = now();
        if (t >= next) {
            round_(threads);
            next += hb;
            if (next < t) next = t;
        }
    }
}
