/*
 * den-agent: PID 1 of a den microVM guest.
 *
 * It serves den's control channel (see ../PROTOCOL.md) on a virtio-serial
 * port and reaps every process of the guest. One thread, one poll loop, fixed
 * buffers: the host is den, but whatever runs in the guest must not be able to
 * make PID 1 grow or crash (a PID 1 crash panics the guest), so every input is
 * checked and every failure becomes an ERROR frame.
 *
 * Build: gcc -static -O2 -Wall -Wextra -Werror -o den-agent den-agent.c
 * Run:   den-agent --port den.agent   (in the guest, as PID 1)
 *        den-agent --fd N             (tests: N is a connected or listening socket)
 *        den-agent --setup --modules DIR [--root DIR ...]
 *                                     (den-init's steps: setup_main)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define VERSION 1
#define MAGIC0 0x64 /* 'd' */
#define MAGIC1 0x6e /* 'n' */
#define HDR 12
#define TRAILER 4
#define MAX_PAYLOAD 65536
#define DATA_CHUNK 32768
#define WINDOW_IN 65536   /* host -> agent bytes in flight per channel (our stdin buffer) */
#define WINDOW_OUT 262144 /* agent -> host bytes in flight per channel (the host's buffer) */
#define MAX_CHANNELS 64
#define MAX_ARGS 4096
#define MAX_GROUPS 256
#define MAX_MSG 200
#define INBUF (HDR + MAX_PAYLOAD + TRAILER + 65536)
#define OUTBUF (1 << 20)
#define REPLY_ROOM 4096 /* outbuf space kept for replies; input is parsed only above it */
#define EXIT_GRACE_MS 200

enum {
	T_HELLO = 1, T_EXEC = 2, T_CONNECT = 3, T_DATA = 4, T_DATA_ERR = 5, T_EOF = 6,
	T_WINDOW = 7, T_SIGNAL = 8, T_RESIZE = 9, T_EXIT = 10, T_CLOSE = 11, T_ERROR = 12,
	T_OPENED = 13, T_SETTIME = 14, T_POWEROFF = 15, T_PING = 16, T_OK = 17,
};

enum { K_FREE = 0, K_EXEC, K_TCP_CONNECTING, K_TCP };

struct chan {
	int kind;
	uint32_t id;
	pid_t pid;          /* exec: the command (a session and process group leader) */
	int exited;         /* reaped; exit frame pending or sent */
	int exit_sent;
	int status;
	long long exited_at;
	int in_fd;          /* where host data goes: stdin pipe, pty master or socket */
	int out_fd[3];      /* [1] stdout / pty / socket, [2] stderr; -1 once at EOF */
	int tty;
	int in_eof;         /* host sent EOF: close/shutdown once the buffer is written */
	uint8_t *inbuf;     /* WINDOW_IN bytes */
	size_t in_len;
	uint32_t credit;    /* bytes we may still send the host */
};

static struct chan chans[MAX_CHANNELS];
static uint8_t inbuf[INBUF];
static size_t in_len;
static uint8_t outbuf[OUTBUF];
static size_t out_len;
static int synced;      /* a HELLO was seen on this connection */
static int conn = -1;   /* the connection (port or socket); -1 while the host is away */
static int listen_fd = -1;
static int port_mode;
static const char *port_name;
static int sig_fd = -1;
static int is_pid1;
static uint8_t boot_id[16];
static uint32_t crc_table[256];

static long long now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void logmsg(const char *fmt, ...)
{
	char buf[256];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n > sizeof buf - 2)
		n = sizeof buf - 2;
	buf[n++] = '\n';
	/* stderr is the console in the guest; never block PID 1 on it */
	ssize_t w = write(2, "den-agent: ", 11);
	w = write(2, buf, (size_t)n);
	(void)w;
}

static void crc_init(void)
{
	for (uint32_t i = 0; i < 256; i++) {
		uint32_t c = i;
		for (int k = 0; k < 8; k++)
			c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
		crc_table[i] = c;
	}
}

static uint32_t crc32_of(const uint8_t *p, size_t n)
{
	uint32_t c = 0xFFFFFFFFu;
	while (n--)
		c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
	return c ^ 0xFFFFFFFFu;
}

static void put32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}
static uint32_t get16(const uint8_t *p) { return (uint32_t)p[0] << 8 | p[1]; }
static uint32_t get32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static uint64_t get64(const uint8_t *p) { return (uint64_t)get32(p) << 32 | get32(p + 4); }

static size_t out_free(void) { return OUTBUF - out_len; }

/* Append a frame; the caller made sure it fits (replies have REPLY_ROOM, data checks first). */
static void send_frame(int type, uint32_t ch, const void *payload, size_t len)
{
	if (conn < 0 || !synced || HDR + len + TRAILER > out_free())
		return;
	uint8_t *p = outbuf + out_len;
	p[0] = MAGIC0; p[1] = MAGIC1; p[2] = (uint8_t)type; p[3] = 0;
	put32(p + 4, ch);
	put32(p + 8, (uint32_t)len);
	if (len)
		memcpy(p + HDR, payload, len);
	put32(p + HDR + len, crc32_of(p, HDR + len));
	out_len += HDR + len + TRAILER;
}

static void send_error(uint32_t ch, int err, const char *fmt, ...)
{
	uint8_t buf[4 + MAX_MSG];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf((char *)buf + 4, MAX_MSG, fmt, ap);
	va_end(ap);
	if (n < 0)
		n = 0;
	if (n > MAX_MSG - 1)
		n = MAX_MSG - 1;
	put32(buf, (uint32_t)err);
	send_frame(T_ERROR, ch, buf, 4 + (size_t)n);
}

static void send_u32(int type, uint32_t ch, uint32_t v)
{
	uint8_t b[4];
	put32(b, v);
	send_frame(type, ch, b, 4);
}

static struct chan *find_chan(uint32_t id)
{
	for (int i = 0; i < MAX_CHANNELS; i++)
		if (chans[i].kind != K_FREE && chans[i].id == id)
			return &chans[i];
	return NULL;
}

static struct chan *new_chan(uint32_t id)
{
	for (int i = 0; i < MAX_CHANNELS; i++) {
		if (chans[i].kind == K_FREE) {
			struct chan *c = &chans[i];
			uint8_t *buf = c->inbuf ? c->inbuf : malloc(WINDOW_IN);
			if (!buf)
				return NULL;
			memset(c, 0, sizeof *c);
			c->inbuf = buf;
			c->id = id;
			c->in_fd = c->out_fd[0] = c->out_fd[1] = c->out_fd[2] = -1;
			c->credit = WINDOW_OUT;
			return c;
		}
	}
	return NULL;
}

/* To the command's process group; to the command alone if it has not made its session yet. */
static void signal_cmd(pid_t pid, int sig)
{
	if (kill(-pid, sig) < 0)
		kill(pid, sig);
}

static void close_fd(int *fd)
{
	if (*fd >= 0)
		close(*fd);
	*fd = -1;
}

/* Free a channel: kill its command if it still runs (the slot's buffer is kept for reuse). */
static void free_chan(struct chan *c)
{
	if (c->kind == K_EXEC && !c->exited && c->pid > 0)
		signal_cmd(c->pid, SIGKILL);
	int same = c->out_fd[1] == c->in_fd;
	close_fd(&c->out_fd[2]);
	if (same)
		c->out_fd[1] = -1;
	close_fd(&c->out_fd[1]);
	close_fd(&c->in_fd);
	c->kind = K_FREE;
	c->pid = 0;
}

/* The host said hello again or the framing broke: nothing of the old session survives.
 * The output buffer is kept: it may end in half a frame already partly written. */
static void reset_session(void)
{
	for (int i = 0; i < MAX_CHANNELS; i++)
		if (chans[i].kind != K_FREE)
			free_chan(&chans[i]);
	synced = 0;
}

/* ---- exec ------------------------------------------------------------------------- */

struct reader {
	const uint8_t *p;
	size_t left;
	int bad;
};

static uint32_t rd32(struct reader *r)
{
	if (r->left < 4) { r->bad = 1; return 0; }
	uint32_t v = get32(r->p);
	r->p += 4; r->left -= 4;
	return v;
}

static uint32_t rd16(struct reader *r)
{
	if (r->left < 2) { r->bad = 1; return 0; }
	uint32_t v = get16(r->p);
	r->p += 2; r->left -= 2;
	return v;
}

static uint32_t rd8(struct reader *r)
{
	if (r->left < 1) { r->bad = 1; return 0; }
	uint32_t v = r->p[0];
	r->p += 1; r->left -= 1;
	return v;
}

/* A string of len bytes copied, NUL-terminated, into the arena; NULL if malformed. */
static char arena[MAX_PAYLOAD + 2 * MAX_ARGS + 64];
static size_t arena_len;

static char *rdstr(struct reader *r, uint32_t len)
{
	if (r->bad || len > r->left || arena_len + len + 1 > sizeof arena || memchr(r->p, 0, len)) {
		r->bad = 1;
		return NULL;
	}
	char *s = arena + arena_len;
	memcpy(s, r->p, len);
	s[len] = 0;
	arena_len += len + 1;
	r->p += len; r->left -= len;
	return s;
}

static void set_nonblock(int fd)
{
	int fl = fcntl(fd, F_GETFL);
	if (fl >= 0)
		fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static void child_fail(const char *what, const char *arg)
{
	char buf[512];
	int n = snprintf(buf, sizeof buf, "den-agent: %s %s: %s\n", what, arg, strerror(errno));
	if (n > 0) {
		ssize_t w = write(2, buf, (size_t)n < sizeof buf ? (size_t)n : sizeof buf - 1);
		(void)w;
	}
	_exit(errno == ENOENT ? 127 : 126);
}

static void do_exec(uint32_t id, const uint8_t *p, size_t len)
{
	static char *argv[MAX_ARGS + 1], *envp[MAX_ARGS + 1];
	static gid_t groups[MAX_GROUPS];
	struct reader r = {p, len, 0};
	arena_len = 0;
	uint32_t uid = rd32(&r), gid = rd32(&r), ngroups = rd32(&r);
	if (ngroups > MAX_GROUPS) {
		send_error(id, E2BIG, "exec: %u groups, at most %d", ngroups, MAX_GROUPS);
		return;
	}
	for (uint32_t i = 0; i < ngroups; i++)
		groups[i] = rd32(&r);
	uint32_t tty = rd8(&r), cols = 0, rows = 0;
	char *term = NULL;
	if (tty) {
		cols = rd16(&r);
		rows = rd16(&r);
		term = rdstr(&r, rd16(&r));
	}
	char *cwd = rdstr(&r, rd16(&r));
	uint32_t argc = rd32(&r);
	if (r.bad) {
		send_error(id, EINVAL, "exec: malformed request");
		return;
	}
	if (argc == 0 || argc > MAX_ARGS) {
		send_error(id, E2BIG, "exec: argv has %u entries (1 to %d)", argc, MAX_ARGS);
		return;
	}
	for (uint32_t i = 0; i < argc && !r.bad; i++)
		argv[i] = rdstr(&r, rd32(&r));
	argv[argc] = NULL;
	uint32_t envc = rd32(&r);
	if (r.bad) {
		send_error(id, EINVAL, "exec: malformed request");
		return;
	}
	if (envc > MAX_ARGS) {
		send_error(id, E2BIG, "exec: env has %u entries, at most %d", envc, MAX_ARGS);
		return;
	}
	for (uint32_t i = 0; i < envc && !r.bad; i++)
		envp[i] = rdstr(&r, rd32(&r));
	envp[envc] = NULL;
	if (r.bad || r.left) {
		send_error(id, EINVAL, "exec: malformed request");
		return;
	}
	struct chan *c = new_chan(id);
	if (!c) {
		send_error(id, EMFILE, "too many channels (at most %d)", MAX_CHANNELS);
		return;
	}
	int child_fd[3] = {-1, -1, -1};
	int master = -1;
	char *slave = NULL;
	if (tty) {
		master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
		if (master < 0 || grantpt(master) < 0 || unlockpt(master) < 0 || !(slave = ptsname(master))) {
			send_error(id, errno, "pty: %s", strerror(errno));
			if (master >= 0)
				close(master);
			return;
		}
		struct winsize ws = {.ws_row = (unsigned short)rows, .ws_col = (unsigned short)cols};
		ioctl(master, TIOCSWINSZ, &ws);
		c->in_fd = c->out_fd[1] = master;
		c->tty = 1;
	} else {
		int pin[2], pout[2], perr[2];
		if (pipe2(pin, O_CLOEXEC) < 0) {
			send_error(id, errno, "pipe: %s", strerror(errno));
			return;
		}
		if (pipe2(pout, O_CLOEXEC) < 0) {
			send_error(id, errno, "pipe: %s", strerror(errno));
			close(pin[0]); close(pin[1]);
			return;
		}
		if (pipe2(perr, O_CLOEXEC) < 0) {
			send_error(id, errno, "pipe: %s", strerror(errno));
			close(pin[0]); close(pin[1]); close(pout[0]); close(pout[1]);
			return;
		}
		child_fd[0] = pin[0]; child_fd[1] = pout[1]; child_fd[2] = perr[1];
		c->in_fd = pin[1]; c->out_fd[1] = pout[0]; c->out_fd[2] = perr[0];
	}
	pid_t pid = fork();
	if (pid < 0) {
		int e = errno;
		for (int i = 0; i < 3; i++)
			close_fd(&child_fd[i]);
		c->kind = K_EXEC;
		c->exited = 1;
		free_chan(c);
		send_error(id, e, "fork: %s", strerror(e));
		return;
	}
	if (pid == 0) {
		sigset_t all;
		sigemptyset(&all);
		sigprocmask(SIG_SETMASK, &all, NULL);
		for (int s = 1; s < NSIG; s++)
			signal(s, SIG_DFL);
		setsid();
		if (tty) {
			int fd = open(slave, O_RDWR); /* the first tty a session leader opens is its controlling tty */
			if (fd < 0)
				_exit(126);
			ioctl(fd, TIOCSCTTY, 0);
			child_fd[0] = child_fd[1] = child_fd[2] = fd;
		}
		for (int i = 0; i < 3; i++)
			if (dup2(child_fd[i], i) < 0)
				_exit(126);
		close_range(3, ~0U, 0);
		if (setgroups(ngroups, groups) < 0)
			child_fail("setgroups", "");
		if (setgid(gid) < 0)
			child_fail("setgid", "");
		if (setuid(uid) < 0)
			child_fail("setuid", "");
		if (chdir(cwd) < 0)
			child_fail("chdir", cwd);
		if (tty && term) {
			int has = 0;
			for (uint32_t i = 0; i < envc; i++)
				if (!strncmp(envp[i], "TERM=", 5))
					has = 1;
			if (!has && envc < MAX_ARGS) {
				static char tbuf[300];
				snprintf(tbuf, sizeof tbuf, "TERM=%s", term);
				envp[envc] = tbuf;
				envp[envc + 1] = NULL;
			}
		}
		environ = envp; /* execvp searches the command's PATH, not ours */
		execvp(argv[0], argv);
		child_fail("exec", argv[0]);
	}
	if (!tty)
		for (int i = 0; i < 3; i++)
			close_fd(&child_fd[i]);
	c->kind = K_EXEC;
	c->pid = pid;
	set_nonblock(c->in_fd);
	set_nonblock(c->out_fd[1]);
	if (c->out_fd[2] >= 0)
		set_nonblock(c->out_fd[2]);
	send_u32(T_OPENED, id, (uint32_t)pid);
}

/* ---- tcp -------------------------------------------------------------------------- */

static void do_connect(uint32_t id, const uint8_t *p, size_t len)
{
	struct reader r = {p, len, 0};
	arena_len = 0;
	uint32_t port = rd16(&r);
	char *host = rdstr(&r, rd16(&r));
	if (r.bad || r.left || port == 0) {
		send_error(id, EINVAL, "connect: malformed request");
		return;
	}
	/* Addresses only: name resolution would block this single thread. */
	if (!strcmp(host, "localhost"))
		host = "127.0.0.1";
	struct sockaddr_storage sa;
	socklen_t salen;
	memset(&sa, 0, sizeof sa);
	struct sockaddr_in *s4 = (struct sockaddr_in *)&sa;
	struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&sa;
	if (inet_pton(AF_INET, host, &s4->sin_addr) == 1) {
		s4->sin_family = AF_INET;
		s4->sin_port = htons((uint16_t)port);
		salen = sizeof *s4;
	} else if (inet_pton(AF_INET6, host, &s6->sin6_addr) == 1) {
		s6->sin6_family = AF_INET6;
		s6->sin6_port = htons((uint16_t)port);
		salen = sizeof *s6;
	} else {
		send_error(id, EINVAL, "connect: %.64s is not an IP address", host);
		return;
	}
	struct chan *c = new_chan(id);
	if (!c) {
		send_error(id, EMFILE, "too many channels (at most %d)", MAX_CHANNELS);
		return;
	}
	int fd = socket(sa.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		send_error(id, errno, "socket: %s", strerror(errno));
		return;
	}
	c->in_fd = c->out_fd[1] = fd;
	if (connect(fd, (struct sockaddr *)&sa, salen) == 0) {
		c->kind = K_TCP;
		send_u32(T_OPENED, id, 0);
	} else if (errno == EINPROGRESS) {
		c->kind = K_TCP_CONNECTING;
	} else {
		int e = errno;
		c->kind = K_TCP;
		free_chan(c);
		send_error(id, e, "connect: %s", strerror(e));
	}
}

static void tcp_connected(struct chan *c)
{
	int err = 0;
	socklen_t l = sizeof err;
	if (getsockopt(c->in_fd, SOL_SOCKET, SO_ERROR, &err, &l) < 0)
		err = errno;
	if (err) {
		uint32_t id = c->id;
		free_chan(c);
		send_error(id, err, "connect: %s", strerror(err));
		return;
	}
	c->kind = K_TCP;
	send_u32(T_OPENED, c->id, 0);
}

/* ---- the rest of the operations ----------------------------------------------------- */

static void poweroff_now(void)
{
	logmsg("powering off");
	kill(-1, SIGTERM);
	long long deadline = now_ms() + 2000;
	while (now_ms() < deadline) {
		while (waitpid(-1, NULL, WNOHANG) > 0)
			;
		if (kill(-1, 0) < 0 && errno == ESRCH)
			break;
		usleep(20000);
	}
	kill(-1, SIGKILL);
	while (waitpid(-1, NULL, WNOHANG) > 0)
		;
	sync();
	reboot(RB_POWER_OFF);
	_exit(0);
}

static void set_clock(uint64_t ns, uint32_t reply_ch)
{
	struct timespec ts = {.tv_sec = (time_t)(ns / 1000000000ull), .tv_nsec = (long)(ns % 1000000000ull)};
	if (!is_pid1) {
		/* a test harness on the host must never move the host's clock */
		if (reply_ch)
			send_error(reply_ch, EPERM, "settime: only as PID 1 of a guest");
		return;
	}
	if (clock_settime(CLOCK_REALTIME, &ts) < 0) {
		if (reply_ch)
			send_error(reply_ch, errno, "settime: %s", strerror(errno));
		return;
	}
	if (reply_ch)
		send_frame(T_OK, reply_ch, NULL, 0);
}

static void handle_frame(int type, uint32_t ch, const uint8_t *p, size_t len)
{
	struct chan *c;
	if (type == T_HELLO) {
		uint8_t b[4 + 8 + 16 + 4 + 4];
		if (len != 20 || ch != 0) {
			send_error(ch, EINVAL, "hello: malformed");
			return;
		}
		reset_session(); /* a new hello is a new session */
		synced = 1;
		uint64_t host_ns = get64(p + 12);
		struct timespec ts;
		clock_gettime(CLOCK_REALTIME, &ts);
		long long ours = (long long)ts.tv_sec * 1000000000ll + ts.tv_nsec;
		if (host_ns && llabs(ours - (long long)host_ns) > 1000000000ll)
			set_clock(host_ns, 0);
		put32(b, VERSION);
		memcpy(b + 4, p + 4, 8); /* the host's nonce: tells this session's reply from stale bytes */
		memcpy(b + 12, boot_id, 16);
		put32(b + 28, MAX_PAYLOAD);
		put32(b + 32, MAX_CHANNELS);
		send_frame(T_HELLO, 0, b, sizeof b);
		return;
	}
	if (ch == 0) {
		send_error(0, EINVAL, "frame type %d needs a channel", type);
		return;
	}
	switch (type) {
	case T_EXEC:
	case T_CONNECT:
		if (find_chan(ch)) {
			send_error(ch, EEXIST, "channel %u is in use", ch);
			return;
		}
		if (type == T_EXEC)
			do_exec(ch, p, len);
		else
			do_connect(ch, p, len);
		return;
	case T_PING:
		if (len > 64) {
			send_error(ch, EINVAL, "ping: payload over 64 bytes");
			return;
		}
		send_frame(T_OK, ch, p, len);
		return;
	case T_SETTIME:
		if (len != 8) {
			send_error(ch, EINVAL, "settime: malformed");
			return;
		}
		set_clock(get64(p), ch);
		return;
	case T_POWEROFF:
		if (!is_pid1) {
			send_error(ch, EPERM, "poweroff: only as PID 1 of a guest");
			return;
		}
		send_frame(T_OK, ch, NULL, 0);
		/* best effort: let the host see the OK before we go */
		if (conn >= 0 && out_len) {
			ssize_t w = write(conn, outbuf, out_len);
			(void)w;
		}
		poweroff_now();
		return;
	}
	c = find_chan(ch);
	if (!c) {
		/* a late frame for a channel already closed is normal; say so only for requests */
		if (type != T_DATA && type != T_EOF && type != T_WINDOW && type != T_CLOSE && type != T_SIGNAL &&
		    type != T_RESIZE)
			send_error(ch, EINVAL, "unknown frame type %d", type);
		return;
	}
	switch (type) {
	case T_DATA:
		if (c->in_eof || len > WINDOW_IN - c->in_len) {
			send_error(ch, EPROTO, "data past the window or after eof (dropped)");
			return;
		}
		if (c->in_fd < 0) {
			send_u32(T_WINDOW, ch, (uint32_t)len); /* stdin is closed: dropped, credit back */
			return;
		}
		memcpy(c->inbuf + c->in_len, p, len);
		c->in_len += len;
		return;
	case T_EOF:
		if (!c->tty && !c->in_eof)
			c->in_eof = 1; /* a terminal has no end of input; ^D is the user's to type */
		return;
	case T_WINDOW:
		if (len != 4) {
			send_error(ch, EINVAL, "window: malformed");
			return;
		}
		{
			uint64_t v = (uint64_t)c->credit + get32(p);
			c->credit = v > WINDOW_OUT ? WINDOW_OUT : (uint32_t)v;
		}
		return;
	case T_SIGNAL:
		if (len != 4 || get32(p) == 0 || get32(p) >= NSIG) {
			send_error(ch, EINVAL, "signal: malformed");
			return;
		}
		if (c->kind == K_EXEC && !c->exited)
			signal_cmd(c->pid, (int)get32(p));
		return;
	case T_RESIZE:
		if (len != 4) {
			send_error(ch, EINVAL, "resize: malformed");
			return;
		}
		if (c->tty && c->in_fd >= 0) {
			struct winsize ws = {.ws_row = (unsigned short)get16(p + 2), .ws_col = (unsigned short)get16(p)};
			ioctl(c->in_fd, TIOCSWINSZ, &ws);
		}
		return;
	case T_CLOSE:
		free_chan(c);
		return;
	default:
		send_error(ch, EINVAL, "unknown frame type %d", type);
	}
}

/* Parse what came in. Before a HELLO, or after the framing broke, skip to the next HELLO. */
static void parse_input(void)
{
	size_t off = 0;
	while (out_free() >= REPLY_ROOM) {
		size_t avail = in_len - off;
		uint8_t *p = inbuf + off;
		if (avail < HDR)
			break;
		int type = p[2];
		uint32_t ch = get32(p + 4), len = get32(p + 8);
		int hello_hdr = p[0] == MAGIC0 && p[1] == MAGIC1 && type == T_HELLO && ch == 0 && len == 20;
		if (!synced && !hello_hdr) {
			off++; /* hunt for a hello */
			continue;
		}
		if (p[0] != MAGIC0 || p[1] != MAGIC1 || len > MAX_PAYLOAD) {
			if (len > MAX_PAYLOAD && p[0] == MAGIC0 && p[1] == MAGIC1)
				send_error(0, EMSGSIZE, "frame of %u bytes over the cap of %d; resynchronising", len,
					   MAX_PAYLOAD);
			else
				send_error(0, EPROTO, "bad frame header; resynchronising");
			reset_session();
			off++;
			continue;
		}
		if (avail < HDR + len + TRAILER)
			break;
		if (get32(p + HDR + len) != crc32_of(p, HDR + len)) {
			if (synced) {
				send_error(0, EPROTO, "bad frame checksum; resynchronising");
				reset_session();
			}
			off++;
			continue;
		}
		off += HDR + len + TRAILER;
		handle_frame(type, ch, p + HDR, len);
	}
	if (off) {
		memmove(inbuf, inbuf + off, in_len - off);
		in_len -= off;
	}
}

/* ---- the loop ----------------------------------------------------------------------- */

static void reap(void)
{
	int st;
	pid_t pid;
	while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
		for (int i = 0; i < MAX_CHANNELS; i++) {
			struct chan *c = &chans[i];
			if (c->kind == K_EXEC && c->pid == pid && !c->exited) {
				c->exited = 1;
				c->status = st;
				c->exited_at = now_ms();
			}
		}
	}
}

static void maybe_send_exit(struct chan *c)
{
	if (c->kind != K_EXEC || !c->exited || c->exit_sent)
		return;
	/* Exit follows the output, unless a background process holds the pipes open. */
	if ((c->out_fd[1] >= 0 || c->out_fd[2] >= 0) && now_ms() - c->exited_at < EXIT_GRACE_MS)
		return;
	if (out_free() < REPLY_ROOM)
		return;
	uint8_t b[8];
	if (WIFSIGNALED(c->status)) {
		put32(b, (uint32_t)(128 + WTERMSIG(c->status)));
		put32(b + 4, (uint32_t)WTERMSIG(c->status));
	} else {
		put32(b, (uint32_t)WEXITSTATUS(c->status));
		put32(b + 4, 0);
	}
	send_frame(T_EXIT, c->id, b, sizeof b);
	c->exit_sent = 1;
}

static void read_output(struct chan *c, int stream)
{
	int fd = c->out_fd[stream];
	if (fd < 0 || c->credit == 0 || out_free() < REPLY_ROOM + HDR + DATA_CHUNK + TRAILER)
		return;
	uint8_t buf[DATA_CHUNK];
	size_t want = c->credit < DATA_CHUNK ? c->credit : DATA_CHUNK;
	ssize_t n = read(fd, buf, want);
	if (n > 0) {
		c->credit -= (uint32_t)n;
		send_frame(stream == 2 ? T_DATA_ERR : T_DATA, c->id, buf, (size_t)n);
		return;
	}
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (n < 0 && c->kind == K_TCP && errno != EIO) {
		int e = errno;
		send_error(c->id, e, "read: %s", strerror(e));
	}
	/* EOF (a pty says EIO once the last slave fd is closed) */
	uint8_t s = (uint8_t)stream;
	send_frame(T_EOF, c->id, &s, 1);
	if (c->in_fd == fd) {
		if (c->kind == K_TCP) {
			c->out_fd[stream] = -1; /* the socket stays open for writing */
			return;
		}
		c->in_fd = -1;
		c->in_len = 0;
	}
	close(fd);
	c->out_fd[stream] = -1;
}

static void write_input(struct chan *c)
{
	if (c->in_fd < 0) {
		/* nowhere to write any more: drop it, and give the credit back */
		if (c->in_len)
			send_u32(T_WINDOW, c->id, (uint32_t)c->in_len);
		c->in_len = 0;
		return;
	}
	if (c->in_len) {
		ssize_t n = write(c->in_fd, c->inbuf, c->in_len);
		if (n > 0) {
			memmove(c->inbuf, c->inbuf + n, c->in_len - (size_t)n);
			c->in_len -= (size_t)n;
			send_u32(T_WINDOW, c->id, (uint32_t)n);
		} else if (n < 0 && errno != EAGAIN && errno != EINTR) {
			/* the command closed its stdin: what the host sends is dropped, credit returned */
			send_u32(T_WINDOW, c->id, (uint32_t)c->in_len);
			c->in_len = 0;
			if (c->kind == K_EXEC && !c->tty)
				close_fd(&c->in_fd);
		}
	}
	if (!c->in_len && c->in_eof == 1 && c->in_fd >= 0) {
		c->in_eof = 2;
		if (c->kind == K_TCP)
			shutdown(c->in_fd, SHUT_WR); /* the socket stays open for reading until CLOSE */
		else
			close_fd(&c->in_fd);
	}
}

static void open_port(void)
{
	DIR *d = opendir("/sys/class/virtio-ports");
	struct dirent *e;
	if (!d)
		return;
	while ((e = readdir(d))) {
		char path[300], name[128];
		if (e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			continue;
		ssize_t n = read(fd, name, sizeof name - 1);
		close(fd);
		if (n <= 0)
			continue;
		name[n] = 0;
		if (name[n - 1] == '\n')
			name[n - 1] = 0;
		if (strcmp(name, port_name))
			continue;
		snprintf(path, sizeof path, "/dev/%s", e->d_name);
		conn = open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
		if (conn < 0)
			logmsg("open %s: %s", path, strerror(errno));
		break;
	}
	closedir(d);
}

static void host_gone(void)
{
	reset_session();
	in_len = 0;
	out_len = 0;
	if (port_mode)
		return; /* the port stays open; it reads again when the host reconnects */
	close_fd(&conn);
	if (listen_fd < 0) {
		logmsg("connection closed; exiting");
		for (int i = 0; i < MAX_CHANNELS; i++)
			if (chans[i].kind != K_FREE)
				free_chan(&chans[i]);
		exit(0);
	}
}

/* ---- --setup: den-init's early steps ------------------------------------------------ */
/* Under TCG every fork and exec is emulated work: nine insmod and four ip processes
 * cost den-init about a quarter of a second. Done here, in one process, they cost
 * only what the kernel does for them. Failures print den-init's own failure line
 * (its contract: "den-init: failed: <why>") and exit 1; den-init powers off. */

static int setup_fail(const char *fmt, ...)
{
	char buf[300];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	printf("den-init: failed: %s\n", buf);
	fflush(stdout);
	return 1;
}

static int load_modules(const char *dir)
{
	char path[512], line[256];
	snprintf(path, sizeof path, "%s/load", dir);
	FILE *f = fopen(path, "re");
	if (!f)
		return setup_fail("cannot read %s: %s", path, strerror(errno));
	while (fgets(line, sizeof line, f)) {
		line[strcspn(line, "\n")] = 0;
		if (!line[0])
			continue;
		snprintf(path, sizeof path, "%s/%s", dir, line);
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0 || (syscall(SYS_finit_module, fd, "", 0) < 0 && errno != EEXIST)) {
			int err = errno;
			if (fd >= 0)
				close(fd);
			fclose(f);
			return setup_fail("cannot load module %s: %s", line, strerror(err));
		}
		close(fd);
	}
	fclose(f);
	return 0;
}

static int set_up(int s, const char *dev)
{
	struct ifreq r = {0};
	snprintf(r.ifr_name, IFNAMSIZ, "%s", dev);
	if (ioctl(s, SIOCGIFFLAGS, &r) < 0)
		return -1;
	r.ifr_flags |= IFF_UP;
	return ioctl(s, SIOCSIFFLAGS, &r);
}

/* The interface with MAC (any but lo when MAC is empty); the driver may still bind. */
static int find_nic(const char *mac, char *dev)
{
	for (int tries = 0; tries < 20; tries++) {
		DIR *d = opendir("/sys/class/net");
		struct dirent *e;
		while (d && (e = readdir(d))) {
			char path[300], addr[64] = "";
			if (e->d_name[0] == '.' || !strcmp(e->d_name, "lo") || strlen(e->d_name) >= IFNAMSIZ)
				continue;
			snprintf(path, sizeof path, "/sys/class/net/%s/address", e->d_name);
			int fd = open(path, O_RDONLY | O_CLOEXEC);
			ssize_t n = fd < 0 ? -1 : read(fd, addr, sizeof addr - 1);
			if (fd >= 0)
				close(fd);
			addr[n > 0 ? n : 0] = 0;
			addr[strcspn(addr, "\n")] = 0;
			if (!mac[0] || !strcasecmp(addr, mac)) {
				strcpy(dev, e->d_name);
				closedir(d);
				return 0;
			}
		}
		if (d)
			closedir(d);
		usleep(50000);
	}
	return -1;
}

static struct sockaddr_in *sin_of(struct sockaddr *sa)
{
	return (struct sockaddr_in *)(void *)sa;
}

static int set_network(const char *cidr, const char *gw, const char *mac)
{
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (s < 0)
		return setup_fail("socket: %s", strerror(errno));
	if (set_up(s, "lo") < 0)
		return setup_fail("cannot bring lo up: %s", strerror(errno));
	if (!cidr[0])
		return close(s), 0;
	char ip[64], dev[IFNAMSIZ] = "";
	const char *slash = strchr(cidr, '/');
	char *end;
	long prefix = slash ? strtol(slash + 1, &end, 10) : -1;
	struct in_addr a, g;
	snprintf(ip, sizeof ip, "%.*s", slash ? (int)(slash - cidr) : 0, cidr);
	if (!slash || *end || prefix < 0 || prefix > 32 || inet_pton(AF_INET, ip, &a) != 1)
		return setup_fail("bad address %s", cidr);
	if (find_nic(mac, dev) < 0)
		return setup_fail("no network interface%s%s", mac[0] ? " with MAC " : "", mac);
	struct ifreq r = {0};
	snprintf(r.ifr_name, IFNAMSIZ, "%s", dev);
	sin_of(&r.ifr_addr)->sin_family = AF_INET;
	sin_of(&r.ifr_addr)->sin_addr = a;
	if (ioctl(s, SIOCSIFADDR, &r) < 0)
		return setup_fail("cannot set address %s on %s: %s", cidr, dev, strerror(errno));
	sin_of(&r.ifr_netmask)->sin_family = AF_INET;
	sin_of(&r.ifr_netmask)->sin_addr.s_addr = htonl(prefix ? 0xffffffffu << (32 - prefix) : 0);
	if (ioctl(s, SIOCSIFNETMASK, &r) < 0)
		return setup_fail("cannot set address %s on %s: %s", cidr, dev, strerror(errno));
	if (set_up(s, dev) < 0)
		return setup_fail("cannot bring %s up: %s", dev, strerror(errno));
	if (gw[0]) {
		struct rtentry rt = {0};
		if (inet_pton(AF_INET, gw, &g) != 1)
			return setup_fail("bad gateway %s", gw);
		sin_of(&rt.rt_dst)->sin_family = AF_INET;
		sin_of(&rt.rt_genmask)->sin_family = AF_INET;
		sin_of(&rt.rt_gateway)->sin_family = AF_INET;
		sin_of(&rt.rt_gateway)->sin_addr = g;
		rt.rt_flags = RTF_UP | RTF_GATEWAY;
		rt.rt_dev = dev;
		if (ioctl(s, SIOCADDRT, &rt) < 0)
			return setup_fail("cannot add the route via %s: %s", gw, strerror(errno));
	}
	close(s);
	return 0;
}

/* mount_at: DIR must be a real directory, never a symbolic link (a link in the
 * workspace's tree would point the mount at the initramfs itself); made if missing. */
static int mount_at(const char *type, const char *src, const char *dir, const char *opts)
{
	struct stat st;
	if (lstat(dir, &st) == 0 && S_ISLNK(st.st_mode))
		return setup_fail("%s is a symbolic link", dir);
	if ((lstat(dir, &st) < 0 || !S_ISDIR(st.st_mode)) && mkdir(dir, 0755) < 0)
		return setup_fail("cannot make %s", dir);
	if (mount(src, dir, type, 0, opts) < 0)
		return setup_fail("cannot mount %s %s at %s: %s", type, src, dir, strerror(errno));
	return 0;
}

static int write_file(const char *path, const char *text, mode_t mode)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, mode);
	size_t n = strlen(text);
	if (fd < 0 || write(fd, text, n) != (ssize_t)n) {
		int err = errno;
		if (fd >= 0)
			close(fd);
		errno = err;
		return -1;
	}
	return close(fd);
}

static int copy_file(const char *from, const char *to)
{
	int in = open(from, O_RDONLY | O_CLOEXEC);
	int out = in < 0 ? -1 : open(to, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0755);
	char buf[65536];
	ssize_t n = 0;
	while (out >= 0 && (n = read(in, buf, sizeof buf)) > 0)
		if (write(out, buf, (size_t)n) != n) {
			n = -1;
			break;
		}
	int ok = in >= 0 && out >= 0 && n == 0;
	if (in >= 0)
		close(in);
	if (out >= 0 && close(out) < 0)
		ok = 0;
	return ok ? 0 : -1;
}

/* Links /dev/virtio-ports/<name> (no udev here makes them); 0 once PORT is there. */
static int link_ports(const char *port)
{
	mkdir("/dev/virtio-ports", 0755);
	for (int tries = 0; tries < 20; tries++) {
		int found = 0;
		DIR *d = opendir("/sys/class/virtio-ports");
		struct dirent *e;
		while (d && (e = readdir(d))) {
			char path[300], name[128], link[300], target[300];
			if (e->d_name[0] == '.')
				continue;
			snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
			int fd = open(path, O_RDONLY | O_CLOEXEC);
			ssize_t n = fd < 0 ? -1 : read(fd, name, sizeof name - 1);
			if (fd >= 0)
				close(fd);
			name[n > 0 ? n : 0] = 0;
			name[strcspn(name, "\n")] = 0;
			if (!name[0] || name[0] == '.' || strchr(name, '/'))
				continue;
			snprintf(link, sizeof link, "/dev/virtio-ports/%s", name);
			snprintf(target, sizeof target, "../%s", e->d_name);
			unlink(link);
			if (symlink(target, link) == 0 && !strcmp(name, port))
				found = 1;
		}
		if (d)
			closedir(d);
		if (found)
			return 0;
		usleep(100000);
	}
	return -1;
}

struct setup {
	const char *modules, *ip, *gw, *mac, *root, *hostname, *dns, *agent, *port;
	int code;
};

/* The root file system and /code, the host name, resolver and hosts (files in a tmpfs
 * of den's, bound over the root file system's own when they are plain files, so the
 * snapshot itself is never written), the agent copied there, the agent's port link,
 * and the kernel's file systems in the new root. */
static int setup_root(const struct setup *o)
{
	char p[512], t[512];
	const char *r = o->root;
	mkdir(r, 0755);
	if (mount("root", r, "virtiofs", 0, NULL) < 0)
		return setup_fail("cannot mount the root filesystem (virtiofs tag root)");
	snprintf(p, sizeof p, "%s/code", r);
	if (o->code && mount_at("virtiofs", "code", p, NULL))
		return 1;
	snprintf(t, sizeof t, "%s\n", o->hostname);
	if (write_file("/proc/sys/kernel/hostname", o->hostname, 0644) < 0)
		return setup_fail("cannot set the hostname %s", o->hostname);
	snprintf(p, sizeof p, "%s/run", r);
	if (mount_at("tmpfs", "den-run", p, NULL))
		return 1;
	snprintf(p, sizeof p, "%s/run/den", r);
	if (mount_at("tmpfs", "den", p, "mode=0755"))
		return 1;
	char hosts[512], resolv[1024] = "";
	snprintf(hosts, sizeof hosts,
		 "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t%s\n",
		 o->hostname);
	for (const char *s = o->dns; *s;) {
		size_t n = strcspn(s, ",");
		size_t used = strlen(resolv);
		if (n && used + n + 13 < sizeof resolv)
			snprintf(resolv + used, sizeof resolv - used, "nameserver %.*s\n", (int)n, s);
		s += n + (s[n] == ',');
	}
	const char *names[3] = {"hostname", "hosts", "resolv.conf"};
	const char *texts[3] = {t, hosts, resolv};
	for (int i = 0; i < 3; i++) {
		struct stat st;
		snprintf(p, sizeof p, "%s/run/den/%s", r, names[i]);
		if (write_file(p, texts[i], 0644) < 0)
			return setup_fail("cannot write %s: %s", p, strerror(errno));
		snprintf(t, sizeof t, "%s/etc/%s", r, names[i]);
		if (lstat(t, &st) == 0 && S_ISREG(st.st_mode) && mount(p, t, NULL, MS_BIND, NULL) < 0)
			return setup_fail("cannot bind /etc/%s", names[i]);
	}
	snprintf(p, sizeof p, "%s/run/den/den-agent", r);
	if (copy_file(o->agent, p) < 0)
		return setup_fail("cannot copy the agent");
	if (link_ports(o->port) < 0)
		return setup_fail("no virtio-serial port %s", o->port);
	static const char *kfs[][4] = {
		{"proc", "proc", "proc", NULL},
		{"sysfs", "sysfs", "sys", NULL},
		{"devtmpfs", "devtmpfs", "dev", NULL},
		{"devpts", "devpts", "dev/pts", "gid=5,mode=0620,ptmxmode=0666"},
		{"tmpfs", "shm", "dev/shm", "mode=1777"},
	};
	for (size_t i = 0; i < sizeof kfs / sizeof kfs[0]; i++) {
		snprintf(p, sizeof p, "%s/%s", r, kfs[i][2]);
		if (mount_at(kfs[i][0], kfs[i][1], p, kfs[i][3]))
			return 1;
	}
	snprintf(p, sizeof p, "%s/dev/ptmx", r);
	if (access(p, F_OK) < 0 && symlink("pts/ptmx", p) < 0)
		return setup_fail("cannot link %s", p);
	return 0;
}

static int setup_main(int argc, char **argv)
{
	struct setup o = {.modules = "", .ip = "", .gw = "", .mac = "", .root = "",
			  .hostname = "den", .dns = "", .agent = "/den-agent", .port = "den.agent"};
	static const char *keys[] = {"--modules", "--ip", "--gw", "--mac", "--root",
				     "--hostname", "--dns", "--agent", "--port", "--code"};
	const char **vals[] = {&o.modules, &o.ip, &o.gw, &o.mac, &o.root,
			       &o.hostname, &o.dns, &o.agent, &o.port};
	for (int i = 2; i < argc; i += 2) {
		size_t k = 0;
		while (k < sizeof keys / sizeof keys[0] && strcmp(argv[i], keys[k]))
			k++;
		if (k == sizeof keys / sizeof keys[0] || i + 1 >= argc) {
			fprintf(stderr, "usage: den-agent --setup --modules DIR [--ip ADDR/PREFIX --gw GW "
					"--mac MAC --root DIR --code 0|1 --hostname H --dns A,B --agent FILE "
					"--port NAME]\n");
			return 2;
		}
		if (k < sizeof vals / sizeof vals[0])
			*vals[k] = argv[i + 1];
		else
			o.code = !strcmp(argv[i + 1], "1");
	}
	if (o.modules[0] && load_modules(o.modules))
		return 1;
	if (!o.root[0])
		return 0; /* the probe: modules only */
	if (set_network(o.ip, o.gw, o.mac))
		return 1;
	return setup_root(&o);
}

int main(int argc, char **argv)
{
	if (argc > 1 && !strcmp(argv[1], "--setup"))
		return setup_main(argc, argv);
	int fd_arg = -1;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--port") && i + 1 < argc)
			port_name = argv[++i];
		else if (!strcmp(argv[i], "--fd") && i + 1 < argc)
			fd_arg = atoi(argv[++i]);
	}
	if (!port_name && fd_arg < 0) {
		fprintf(stderr, "usage: den-agent --port NAME | --fd N\n");
		return 2;
	}
	is_pid1 = getpid() == 1;
	if (!is_pid1)
		prctl(PR_SET_CHILD_SUBREAPER, 1); /* a harness still reaps what its commands leave */
	crc_init();
	{
		int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
		if (fd < 0 || read(fd, boot_id, sizeof boot_id) != (ssize_t)sizeof boot_id) {
			struct timespec ts;
			clock_gettime(CLOCK_REALTIME, &ts);
			memcpy(boot_id, &ts, sizeof ts < sizeof boot_id ? sizeof ts : sizeof boot_id);
		}
		if (fd >= 0)
			close(fd);
	}
	signal(SIGPIPE, SIG_IGN);
	sigset_t mask;
	sigemptyset(&mask);
	sigaddset(&mask, SIGCHLD);
	sigaddset(&mask, SIGTERM);
	sigaddset(&mask, SIGINT);
	sigaddset(&mask, SIGHUP);
	sigprocmask(SIG_BLOCK, &mask, NULL);
	sig_fd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
	if (port_name) {
		port_mode = 1;
		for (int tries = 0; conn < 0 && tries < 100; tries++) {
			open_port();
			if (conn < 0)
				usleep(100000);
		}
		if (conn < 0) {
			logmsg("no virtio port named %s", port_name);
			if (is_pid1)
				poweroff_now();
			return 1;
		}
	} else {
		int acc = 0;
		socklen_t l = sizeof acc;
		if (getsockopt(fd_arg, SOL_SOCKET, SO_ACCEPTCONN, &acc, &l) == 0 && acc)
			listen_fd = fd_arg;
		else
			conn = fd_arg;
		fcntl(fd_arg, F_SETFD, FD_CLOEXEC);
		set_nonblock(fd_arg);
	}
	logmsg("ready (version %d)", VERSION);
	int port_hup = 0;
	for (;;) {
		struct pollfd pfd[2 + 3 * MAX_CHANNELS];
		struct { struct chan *c; int what; } who[3 * MAX_CHANNELS];
		int n = 0, timeout = -1;
		pfd[n++] = (struct pollfd){.fd = sig_fd, .events = POLLIN};
		int conn_i = -1;
		if (conn >= 0 && !port_hup) {
			short ev = 0;
			if (in_len < INBUF)
				ev |= POLLIN;
			if (out_len)
				ev |= POLLOUT;
			conn_i = n;
			pfd[n++] = (struct pollfd){.fd = conn, .events = ev};
		} else if (conn >= 0 && port_hup) {
			timeout = 100; /* a disconnected port polls as HUP for ever: look again later */
		} else if (listen_fd >= 0) {
			conn_i = n;
			pfd[n++] = (struct pollfd){.fd = listen_fd, .events = POLLIN};
		}
		int base = n;
		for (int i = 0; i < MAX_CHANNELS; i++) {
			struct chan *c = &chans[i];
			if (c->kind == K_FREE)
				continue;
			if (c->kind == K_TCP_CONNECTING) {
				who[n - base].c = c; who[n - base].what = 0;
				pfd[n++] = (struct pollfd){.fd = c->in_fd, .events = POLLOUT};
				continue;
			}
			int can_send = c->credit > 0 && out_free() >= REPLY_ROOM + HDR + DATA_CHUNK + TRAILER;
			for (int s = 1; s <= 2; s++) {
				if (c->out_fd[s] < 0)
					continue;
				short ev = can_send ? POLLIN : 0;
				if (s == 1 && c->in_fd == c->out_fd[1] && c->in_len)
					ev |= POLLOUT;
				if (!ev)
					continue;
				who[n - base].c = c; who[n - base].what = s;
				pfd[n++] = (struct pollfd){.fd = c->out_fd[s], .events = ev};
			}
			if (c->in_fd >= 0 && c->in_fd != c->out_fd[1] && (c->in_len || c->in_eof == 1)) {
				who[n - base].c = c; who[n - base].what = 3;
				pfd[n++] = (struct pollfd){.fd = c->in_fd, .events = POLLOUT};
			}
			if (c->kind == K_EXEC && c->exited && !c->exit_sent) {
				long long left = EXIT_GRACE_MS - (now_ms() - c->exited_at);
				int t = left < 1 ? 1 : (int)left;
				if (timeout < 0 || t < timeout)
					timeout = t;
			}
		}
		if (poll(pfd, (nfds_t)n, timeout) < 0 && errno != EINTR)
			continue;
		if (pfd[0].revents & POLLIN) {
			struct signalfd_siginfo si;
			while (read(sig_fd, &si, sizeof si) == (ssize_t)sizeof si) {
				if (si.ssi_signo == SIGCHLD)
					continue;
				if (is_pid1) {
					poweroff_now();
				} else {
					reset_session();
					return 0;
				}
			}
			reap();
		}
		if (port_hup) {
			/* still away? a zero-timeout poll tells */
			struct pollfd p1 = {.fd = conn, .events = POLLIN};
			if (poll(&p1, 1, 0) >= 0 && !(p1.revents & POLLHUP))
				port_hup = 0;
		} else if (conn_i >= 0 && conn < 0 && listen_fd >= 0) {
			if (pfd[conn_i].revents & POLLIN) {
				conn = accept4(listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
				reset_session();
				in_len = 0;
				out_len = 0;
			}
		} else if (conn_i >= 0) {
			short re = pfd[conn_i].revents;
			if (re & POLLOUT && out_len) {
				ssize_t w = write(conn, outbuf, out_len);
				if (w > 0) {
					memmove(outbuf, outbuf + w, out_len - (size_t)w);
					out_len -= (size_t)w;
				}
			}
			if (re & (POLLIN | POLLHUP | POLLERR)) {
				ssize_t r = read(conn, inbuf + in_len, INBUF - in_len);
				if (r > 0) {
					in_len += (size_t)r;
				} else if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
					host_gone();
					if (port_mode)
						port_hup = 1;
				}
			}
		}
		for (int i = base; i < n; i++) {
			struct chan *c = who[i - base].c;
			short re = pfd[i].revents;
			if (!re || c->kind == K_FREE)
				continue;
			int what = who[i - base].what;
			if (what == 0) {
				tcp_connected(c);
			} else if (what == 3) {
				write_input(c);
			} else {
				if (what == 1 && re & POLLOUT)
					write_input(c);
				if (re & (POLLIN | POLLHUP | POLLERR) && c->out_fd[what] >= 0)
					read_output(c, what);
			}
		}
		parse_input();
		/* what needs no fd event: an EOF with nothing left to write, an exit to report */
		for (int i = 0; i < MAX_CHANNELS; i++) {
			struct chan *c = &chans[i];
			if (c->kind == K_FREE)
				continue;
			if (c->in_eof == 1 && !c->in_len)
				write_input(c);
			maybe_send_exit(c);
		}
	}
}
