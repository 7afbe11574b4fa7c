/* Looks up NAME's A record COUNT times from one UDP socket bound to source port PORT, with
 * sendto and recvfrom on the unconnected socket, as a forwarder's fixed-port socket does.
 * Each answer must match its query's ID and come from SERVER:53 (what the application sees).
 * Prints one line per lookup: "answer <ip>" or "lost <n>". Exit 0 if every lookup was
 * answered, 2 otherwise. Built statically with musl-gcc for the container tests. */
#include <arpa/inet.h>
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* A standard query (RD) for NAME's A record; returns its length. */
static size_t build_query(unsigned char *out, unsigned short id, const char *name) {
    size_t n = 0;
    out[n++] = id >> 8;
    out[n++] = id & 0xff;
    out[n++] = 0x01; /* RD */
    out[n++] = 0x00;
    out[n++] = 0; out[n++] = 1; /* QDCOUNT */
    memset(out + n, 0, 6);
    n += 6;
    const char *label = name;
    while (*label) {
        const char *dot = strchr(label, '.');
        size_t len = dot ? (size_t)(dot - label) : strlen(label);
        out[n++] = (unsigned char)len;
        memcpy(out + n, label, len);
        n += len;
        label += len + (dot ? 1 : 0);
    }
    out[n++] = 0;
    out[n++] = 0; out[n++] = 1; /* A */
    out[n++] = 0; out[n++] = 1; /* IN */
    return n;
}

/* The first A record's address in an answer, or 0 if it has none. */
static int first_a(const unsigned char *msg, size_t len, struct in_addr *out) {
    if (len < 12) return 0;
    size_t ancount = (msg[6] << 8) | msg[7];
    size_t at = 12;
    while (at < len && msg[at] != 0) at += msg[at] + 1; /* the question's name */
    at += 5;
    for (size_t i = 0; i < ancount && at < len; i++) {
        if ((msg[at] & 0xc0) == 0xc0) at += 2;
        else { while (at < len && msg[at] != 0) at += msg[at] + 1; at += 1; }
        if (at + 10 > len) return 0;
        unsigned type = (msg[at] << 8) | msg[at + 1];
        unsigned rdlen = (msg[at + 8] << 8) | msg[at + 9];
        at += 10;
        if (type == 1 && rdlen == 4 && at + 4 <= len) {
            memcpy(out, msg + at, 4);
            return 1;
        }
        at += rdlen;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s SERVER PORT NAME COUNT\n", argv[0]);
        return 1;
    }
    struct sockaddr_in server = {.sin_family = AF_INET, .sin_port = htons(53)};
    if (inet_pton(AF_INET, argv[1], &server.sin_addr) != 1) {
        fprintf(stderr, "%s: not an IPv4 address\n", argv[1]);
        return 1;
    }
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in local = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    if (fd < 0 || bind(fd, (struct sockaddr *)&local, sizeof local) != 0) {
        perror("bind");
        return 1;
    }
    int count = atoi(argv[4]), answered = 0;
    for (int i = 0; i < count; i++) {
        unsigned char query[512], answer[4096];
        unsigned short id = (unsigned short)(getpid() * 31 + i);
        size_t qlen = build_query(query, id, argv[3]);
        int ok = 0;
        /* One retry, as resolvers do. */
        for (int attempt = 0; attempt < 2 && !ok; attempt++) {
            if (sendto(fd, query, qlen, 0, (struct sockaddr *)&server, sizeof server) < 0) {
                fprintf(stderr, "sendto: %s\n", strerror(errno));
                continue;
            }
            struct pollfd pfd = {.fd = fd, .events = POLLIN};
            while (!ok && poll(&pfd, 1, 2000) > 0) {
                struct sockaddr_in from;
                socklen_t fromlen = sizeof from;
                ssize_t n = recvfrom(fd, answer, sizeof answer, 0, (struct sockaddr *)&from, &fromlen);
                if (n < 12 || ((answer[0] << 8) | answer[1]) != id) continue;
                if (from.sin_addr.s_addr != server.sin_addr.s_addr || from.sin_port != htons(53)) {
                    char text[INET_ADDRSTRLEN];
                    inet_ntop(AF_INET, &from.sin_addr, text, sizeof text);
                    printf("wrong-source %s:%u\n", text, ntohs(from.sin_port));
                    continue;
                }
                struct in_addr a;
                if (first_a(answer, (size_t)n, &a)) {
                    printf("answer %s\n", inet_ntoa(a));
                    ok = 1;
                }
            }
        }
        if (ok) answered++;
        else printf("lost %d\n", i);
        fflush(stdout);
    }
    return answered == count ? 0 : 2;
}
