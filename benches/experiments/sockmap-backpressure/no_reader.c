/* Experiment, not part of the agent: how many bytes a non-blocking sender
 * can queue on a loopback TCP connection whose receiver never reads. With
 * TCP that is bounded by the two sockets' buffers; the number printed is
 * the backpressure a pod sees when the agent stops reading. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static void die(const char *what)
{
	perror(what);
	exit(1);
}

int main(int argc, char **argv)
{
	long cap = (argc > 1 ? atol(argv[1]) : 4096) << 20; /* MiB */
	static char chunk[65536];
	struct sockaddr_in a = {0};
	int one = 1, l, s, r, n;
	long sent = 0, got = 0;
	const char *why = "the cap";

	a.sin_family = AF_INET;
	a.sin_port = htons(7777);
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if ((l = socket(AF_INET, SOCK_STREAM, 0)) < 0)
		die("socket");
	setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	if (bind(l, (void *)&a, sizeof a) || listen(l, 1))
		die("bind/listen on 127.0.0.1:7777");
	if ((s = socket(AF_INET, SOCK_STREAM, 0)) < 0 || connect(s, (void *)&a, sizeof a))
		die("connect");
	if ((r = accept(l, 0, 0)) < 0)
		die("accept");
	usleep(100000); /* both ends established (and in the map, if any) */

	fcntl(s, F_SETFL, O_NONBLOCK);
	while (sent < cap) {
		n = write(s, chunk, sizeof chunk);
		if (n < 0) {
			why = errno == EAGAIN ? "EAGAIN (backpressure)" : strerror(errno);
			break;
		}
		sent += n;
	}
	printf("sender queued %ld KiB before %s\n", sent >> 10, why);
	fflush(stdout);
	system("grep '^TCP:' /proc/net/sockstat"); /* mem is in pages */

	fcntl(r, F_SETFL, O_NONBLOCK);
	while ((n = read(r, chunk, sizeof chunk)) > 0)
		got += n;
	printf("receiver then read %ld KiB\n", got >> 10);
	return 0;
}
