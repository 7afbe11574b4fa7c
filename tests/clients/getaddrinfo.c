/* Resolves a name with the C library's getaddrinfo and prints one address a line.
 * Built statically with musl-gcc, it is an Alpine-style resolver (musl's own DNS code:
 * one unconnected socket, queries to every nameserver at once, answers accepted only from
 * a nameserver's address and port). Exit 0 if the name resolved, 2 otherwise. */
#include <arpa/inet.h>
#include <netdb.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s NAME inet|inet6|any\n", argv[0]);
        return 1;
    }
    struct addrinfo hints;
    memset(&hints, 0, sizeof hints);
    hints.ai_socktype = SOCK_DGRAM;
    hints.ai_family = strcmp(argv[2], "inet") == 0    ? AF_INET
                      : strcmp(argv[2], "inet6") == 0 ? AF_INET6
                                                      : AF_UNSPEC;
    struct addrinfo *result;
    int rc = getaddrinfo(argv[1], NULL, &hints, &result);
    if (rc != 0) {
        fprintf(stderr, "getaddrinfo(%s): %s\n", argv[1], gai_strerror(rc));
        return 2;
    }
    for (struct addrinfo *ai = result; ai; ai = ai->ai_next) {
        char text[INET6_ADDRSTRLEN];
        const void *addr = ai->ai_family == AF_INET
                               ? (const void *)&((struct sockaddr_in *)ai->ai_addr)->sin_addr
                               : (const void *)&((struct sockaddr_in6 *)ai->ai_addr)->sin6_addr;
        inet_ntop(ai->ai_family, addr, text, sizeof text);
        printf("%s\n", text);
    }
    freeaddrinfo(result);
    return 0;
}
