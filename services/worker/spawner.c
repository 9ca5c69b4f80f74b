/* The per-slot spawner of services/worker/spawner.py, compiled: the same protocol, the same steps in the same order,
 * without a Python process to fork per job (its copy-on-write faults were most of what the Python one costs).
 *
 *   jobmesh-spawner <socket fd> <seccomp fd> [<hidden dir>...]
 *
 * Run by bwrap (spawner.py's ``spawner_argv``) from a sealed memfd, as /proc/self/fd/N: that fd is closed first.
 * The module docstring of spawner.py describes the design; this file follows its ``serve``, ``_start``, ``_init``,
 * ``_namespaces``, ``_find`` and ``decode_request`` step by step. The C library only (no libseccomp: the filter's
 * program comes compiled, read once from the seccomp fd).
 *
 * Per job the spawner clones the job's init straight into new pid, mount, ipc and uts namespaces (its own never change)
 * and sends its pid; the init decodes and checks the request (never the spawner: its memory holds no job's
 * environment, and it zeroes the message once the init exists), makes its mounts, waits at the gate, becomes the
 * job's uid with nothing else, posix_spawns the command, reaps, and reports the job's status.
 */

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#define MAX_REQUEST (1u << 20) /* spawner.py's MAX_REQUEST */
#define REQUEST_FDS 4          /* control socket, stdout, stderr, scratch directory (open_tree) */
#define HEADER_SIZE 18         /* "<4sIIHHH": magic, uid, gid, rlimit count, argv count, env count */
#define RLIMIT_SIZE 12         /* "<IQ": resource, soft and hard limit */
#define LENGTH_SIZE 4          /* "<I" before every string */
#define SCRATCH "/scratch"
#define GATE 'G'

#ifndef SYS_move_mount
#define SYS_move_mount 429 /* the same number on every architecture */
#endif
#ifndef MOVE_MOUNT_F_EMPTY_PATH
#define MOVE_MOUNT_F_EMPTY_PATH 0x4
#endif
#ifndef PR_CAP_AMBIENT
#define PR_CAP_AMBIENT 47
#define PR_CAP_AMBIENT_CLEAR_ALL 4
#endif

/* What the spawner keeps once its bounding set is empty: CAP_KILL, CAP_SETGID, CAP_SETUID, CAP_SYS_ADMIN. */
#define SPAWNER_KEEPS ((1u << CAP_KILL) | (1u << CAP_SETGID) | (1u << CAP_SETUID) | (1u << CAP_SYS_ADMIN))

/* What the spawner keeps for every job. */
static struct sock_fprog seccomp_program;
static char **hidden_dirs;
static int hidden_count;
static int request_socket = -1;
static int lifeline = -1, lifeline_end = -1; /* a pipe nobody writes to: end of file once the spawner is gone */
/* The message: at most MAX_REQUEST bytes, one more to see a longer one. Zeroed once each job's init exists. */
static unsigned char message[MAX_REQUEST + 1];

struct request {
    uint32_t uid, gid;
    uint16_t n_rlimits, n_argv, n_env;
    struct limit {
        uint32_t resource;
        uint64_t value;
    } *rlimits;
    char *cwd;
    char **argv; /* NULL-terminated copies: execve's form */
    char **env;
};

static void die(const char *what) {
    int err = errno;
    fprintf(stderr, "jobmesh-spawner: %s: %s\n", what, strerror(err));
    exit(1);
}

/* One reply on a job's control socket (SOCK_SEQPACKET: one write, one message); the agent may have given up. */
static void send_reply(int fd, const void *data, size_t size) {
    (void)!send(fd, data, size, MSG_NOSIGNAL);
}

static void send_error(int fd, const char *text) {
    char reply[512];
    int n = snprintf(reply, sizeof reply, "E%s", text);
    if (n < 0)
        return;
    send_reply(fd, reply, (size_t)n < sizeof reply ? (size_t)n : sizeof reply - 1);
}

static void send_number(int fd, char kind, uint32_t value) { /* "<cI" and "<ci": kind, 4 bytes little-endian */
    unsigned char reply[5] = {(unsigned char)kind, (unsigned char)value, (unsigned char)(value >> 8),
                              (unsigned char)(value >> 16), (unsigned char)(value >> 24)};
    send_reply(fd, reply, sizeof reply);
}

static uint32_t u32_at(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint16_t u16_at(const unsigned char *p) { return (uint16_t)(p[0] | p[1] << 8); }

static uint64_t u64_at(const unsigned char *p) { return (uint64_t)u32_at(p) | (uint64_t)u32_at(p + 4) << 32; }

/* ---- decoding and checking (spawner.py's decode_request and _check), in the job's init only ---- */

/* The string at `*offset` (length-prefixed) as a NUL-terminated copy; NULL with `*why` set when it runs past `size`. */
static char *take_string(const unsigned char *data, size_t size, size_t *offset, size_t *length, const char **why) {
    if (size - *offset < LENGTH_SIZE) {
        *why = "truncated request";
        return NULL;
    }
    uint32_t n = u32_at(data + *offset);
    *offset += LENGTH_SIZE;
    if (n > size - *offset) {
        *why = "truncated request";
        return NULL;
    }
    char *copy = malloc((size_t)n + 1);
    if (copy == NULL) {
        *why = "out of memory";
        return NULL;
    }
    memcpy(copy, data + *offset, n);
    copy[n] = '\0';
    *offset += n;
    *length = n;
    return copy;
}

static const char *check_string(const char *value, size_t length, const char *nul_error) {
    return strlen(value) != length ? nul_error : NULL;
}

/* NULL when `data` decodes to a request no check refuses; otherwise why not. */
static const char *decode_request(const unsigned char *data, size_t size, struct request *req) {
    if (size < HEADER_SIZE || size > MAX_REQUEST)
        return "a request of the wrong size";
    if (memcmp(data, "JMS1", 4) != 0)
        return "not a spawner request";
    req->uid = u32_at(data + 4);
    req->gid = u32_at(data + 8);
    req->n_rlimits = u16_at(data + 12);
    req->n_argv = u16_at(data + 14);
    req->n_env = u16_at(data + 16);
    size_t offset = HEADER_SIZE;
    if ((size_t)req->n_rlimits * RLIMIT_SIZE > size - offset)
        return "truncated rlimits";
    if ((req->rlimits = calloc((size_t)req->n_rlimits + 1, sizeof *req->rlimits)) == NULL)
        return "out of memory";
    for (size_t i = 0; i < req->n_rlimits; i++, offset += RLIMIT_SIZE) {
        req->rlimits[i].resource = u32_at(data + offset);
        req->rlimits[i].value = u64_at(data + offset + 4);
    }
    req->argv = calloc((size_t)req->n_argv + 1, sizeof(char *));
    req->env = calloc((size_t)req->n_env + 1, sizeof(char *));
    size_t *argv_len = calloc((size_t)req->n_argv + 1, sizeof(size_t));
    size_t *env_len = calloc((size_t)req->n_env + 1, sizeof(size_t));
    if (req->argv == NULL || req->env == NULL || argv_len == NULL || env_len == NULL)
        return "out of memory";
    const char *why = NULL;
    size_t cwd_len = 0;
    if ((req->cwd = take_string(data, size, &offset, &cwd_len, &why)) == NULL)
        return why;
    for (size_t i = 0; i < req->n_argv; i++)
        if ((req->argv[i] = take_string(data, size, &offset, &argv_len[i], &why)) == NULL)
            return why;
    for (size_t i = 0; i < req->n_env; i++)
        if ((req->env[i] = take_string(data, size, &offset, &env_len[i], &why)) == NULL)
            return why;
    if (offset != size)
        return "trailing bytes after the request";
    /* What the spawner refuses whoever asks (spawner.py's _check, in its order). */
    if (req->uid == 0 || req->uid == UINT32_MAX || req->gid == 0 || req->gid == UINT32_MAX)
        return "a job never runs as root";
    if (req->n_argv == 0 || argv_len[0] == 0)
        return "empty command";
    for (size_t i = 0; i < req->n_argv; i++)
        if ((why = check_string(req->argv[i], argv_len[i], "an argument holds a NUL byte")) != NULL)
            return why;
    if ((why = check_string(req->cwd, cwd_len, "the working directory holds a NUL byte")) != NULL)
        return why;
    int inside = strcmp(req->cwd, SCRATCH) == 0 || strncmp(req->cwd, SCRATCH "/", sizeof SCRATCH) == 0;
    size_t n = strlen(req->cwd);
    int dotdot = strstr(req->cwd, "/../") != NULL || (n >= 3 && strcmp(req->cwd + n - 3, "/..") == 0);
    if (!inside || dotdot)
        return "the working directory must be /scratch or inside it";
    for (size_t i = 0; i < req->n_env; i++) {
        if ((why = check_string(req->env[i], env_len[i], "an environment entry holds a NUL byte")) != NULL)
            return why;
        char *equals = strchr(req->env[i], '=');
        if (equals == NULL || equals == req->env[i])
            return "an environment entry must be NAME=value";
    }
    free(argv_len);
    free(env_len);
    return NULL;
}

/* ---- the job's init ---- */

/* "what: error" into `out`, for a reply or the job's stderr. */
static void describe(char *out, size_t size, const char *what, int err) {
    snprintf(out, size, "%s: %s", what, strerror(err));
}

/* The init's mount namespace (a copy of the spawner's, whose mounts are all private: nothing propagates back):
 * without the hidden directories, a fresh /tmp, /dev/shm and /proc, the job's scratch at /scratch. -1 and `what`
 * set on failure. */
static int make_namespaces(int scratch, const char **what) {
    for (int i = 0; i < hidden_count; i++)
        if (umount2(hidden_dirs[i], MNT_DETACH) != 0) {
            *what = "umount of a hidden directory";
            return -1;
        }
    /* Fresh file systems are mounted over the spawner's, never in their place: an unmount makes the kernel wait for
     * an expedited RCU grace period (an interrupt to every CPU), and three of those were a large part of each start.
     * What lies below is empty (/tmp, /dev/shm) or the spawner's /proc, out of the job's reach: it has no capability
     * to unmount what covers them. */
    static const char *const fresh[] = {"/tmp", "/dev/shm"};
    for (size_t i = 0; i < sizeof fresh / sizeof fresh[0]; i++) {
        if (mount("tmpfs", fresh[i], "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777") != 0) {
            *what = i == 0 ? "mount /tmp" : "mount /dev/shm";
            return -1;
        }
    }
    /* The scratch directory: the detached bind mount the agent made of it (open_tree), attached here. */
    if (syscall(SYS_move_mount, scratch, "", AT_FDCWD, SCRATCH, MOVE_MOUNT_F_EMPTY_PATH) != 0) {
        *what = "move_mount /scratch";
        return -1;
    }
    if (mount(NULL, SCRATCH, NULL, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV, NULL) != 0) {
        *what = "remount /scratch";
        return -1;
    }
    close(scratch);
    /* The spawner's /proc shows the host's processes; this one, over it, the job's. */
    if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) != 0) {
        *what = "mount /proc";
        return -1;
    }
    return 0;
}

static int set_capabilities(uint32_t keep) { /* effective and permitted: `keep`; inheritable: nothing */
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof data);
    data[0].effective = data[0].permitted = keep;
    return (int)syscall(SYS_capset, &header, data);
}

/* `command` looked up in the job's PATH as execvp does, by the job's uid; NULL when not found. */
static char *find_command(const char *command, const char *path) {
    if (strchr(command, '/') != NULL)
        return strdup(command);
    size_t command_len = strlen(command);
    for (const char *dir = path;; dir++) {
        const char *end = strchrnul(dir, ':');
        size_t dir_len = (size_t)(end - dir);
        const char *base = dir_len ? dir : ".";
        if (!dir_len)
            dir_len = 1;
        char *candidate = malloc(dir_len + 1 + command_len + 1);
        if (candidate == NULL)
            return NULL;
        memcpy(candidate, base, dir_len);
        size_t n = dir_len;
        if (candidate[n - 1] != '/')
            candidate[n++] = '/';
        memcpy(candidate + n, command, command_len + 1);
        struct stat st;
        if (access(candidate, X_OK) == 0 && !(stat(candidate, &st) == 0 && S_ISDIR(st.st_mode)))
            return candidate;
        free(candidate);
        if (*end == '\0')
            break;
        dir = end;
    }
    errno = ENOENT;
    return NULL;
}

static const char *job_path(char **env) {
    for (char **entry = env; *entry != NULL; entry++)
        if (strncmp(*entry, "PATH=", 5) == 0)
            return *entry + 5;
    return "/usr/bin:/bin";
}

static void write_all(int fd, const char *text) {
    size_t left = strlen(text);
    while (left > 0) {
        ssize_t n = write(fd, text, left);
        if (n <= 0 && errno != EINTR)
            return;
        if (n > 0) {
            text += n;
            left -= (size_t)n;
        }
    }
}

static void report_and_exit(int control, int code) {
    send_number(control, 'X', (uint32_t)code << 8); /* a wait status, as waitpid would give the agent */
    _exit(code);
}

/* The job's init: pid 1 of its pid namespace, in its own mount, ipc and uts namespaces. Never returns. */
static void job_init(size_t size, int control, int out, int err, int scratch) {
    char text[600];
    close(lifeline_end);
    close(request_socket);
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0) { /* the spawner (and so the agent) gone: we go */
        describe(text, sizeof text, "cannot start the job's init: pdeathsig", errno);
        send_error(control, text);
        _exit(1);
    }
    struct request req;
    memset(&req, 0, sizeof req);
    const char *why = decode_request(message, size, &req);
    explicit_bzero(message, size); /* our copy of it: the job's request lives on in `req` alone (copies) */
    if (why != NULL) {
        send_error(control, why);
        _exit(1);
    }
    /* Pid 1 ignores the signals it has no handler for; SIGCHLD at its default, for waitpid. */
    signal(SIGINT, SIG_DFL);
    signal(SIGCHLD, SIG_DFL);
    const char *what = NULL;
    if (make_namespaces(scratch, &what) != 0) {
        char reason[300];
        describe(reason, sizeof reason, what, errno);
        snprintf(text, sizeof text, "cannot set up the job's namespaces: %s", reason);
        send_error(control, text);
        _exit(1);
    }
    /* The gate: nothing of the job's runs before the agent has put this process in the job's cgroup. End of file
     * (the agent gave up, or died) is not a go. */
    char gate[16];
    ssize_t got;
    do
        got = read(control, gate, sizeof gate);
    while (got < 0 && errno == EINTR);
    if (got != 1 || gate[0] != GATE)
        _exit(1);

    const char *step = NULL;
    for (size_t i = 0; i < req.n_rlimits; i++) { /* lowering only: no CAP_SYS_RESOURCE needed */
        struct rlimit limit = {(rlim_t)req.rlimits[i].value, (rlim_t)req.rlimits[i].value};
        if (setrlimit((int)req.rlimits[i].resource, &limit) != 0) {
            step = "setrlimit";
            goto failed;
        }
    }
    if (setgroups(0, NULL) != 0) {
        step = "setgroups";
        goto failed;
    }
    if (setresgid(req.gid, req.gid, req.gid) != 0) {
        step = "setresgid";
        goto failed;
    }
    /* Empties the effective and permitted sets (the bounding set is empty since the spawner's start) and the
     * dumpable flag: the job can neither ptrace its init nor read its /proc files. */
    if (setresuid(req.uid, req.uid, req.uid) != 0) {
        step = "setresuid";
        goto failed;
    }
    /* A change of uid clears the parent-death signal: set again, then make sure the spawner did not die before. */
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0) {
        step = "pdeathsig";
        goto failed;
    }
    char byte;
    if (read(lifeline, &byte, 1) == 0)
        _exit(1);
    if (set_capabilities(0) != 0) { /* the inheritable set too */
        step = "capset";
        goto failed;
    }
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0) {
        step = "clear ambient capabilities";
        goto failed;
    }
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) {
        step = "no_new_privs";
        goto failed;
    }
    if (chdir(req.cwd) != 0) { /* as the job: a directory it may not enter stays closed */
        step = req.cwd;
        goto failed;
    }
    if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &seccomp_program, 0, 0) != 0) { /* the init's and the job's */
        step = "seccomp";
        goto failed;
    }

    char *program = find_command(req.argv[0], job_path(req.env));
    int spawned = program == NULL ? errno : 0;
    pid_t job = -1;
    if (program != NULL) {
        posix_spawn_file_actions_t actions;
        posix_spawnattr_t attr;
        sigset_t defaults, empty;
        sigemptyset(&empty);
        sigemptyset(&defaults);
        sigaddset(&defaults, SIGPIPE);
        sigaddset(&defaults, SIGXFSZ);
        sigaddset(&defaults, SIGINT);
        if (posix_spawn_file_actions_init(&actions) != 0 || posix_spawnattr_init(&attr) != 0 ||
            posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0) != 0 ||
            posix_spawn_file_actions_adddup2(&actions, out, 1) != 0 ||
            posix_spawn_file_actions_adddup2(&actions, err, 2) != 0 ||
            posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK) !=
                0 ||
            posix_spawnattr_setsigdefault(&attr, &defaults) != 0 || posix_spawnattr_setsigmask(&attr, &empty) != 0) {
            step = "posix_spawn's attributes";
            goto failed;
        }
        spawned = posix_spawn(&job, program, &actions, &attr, req.argv, req.env);
    }
    if (spawned != 0) {
        int code = spawned == ENOENT ? 127 : 126;
        snprintf(text, sizeof text, "jobmesh: cannot run %s: %s\n", req.argv[0],
                 program == NULL && spawned == ENOENT ? "command not found" : strerror(spawned));
        write_all(err, text);
        report_and_exit(control, code);
    }
    close(out);
    close(err);
    for (;;) { /* reap every process of the namespace until the job's first one ends */
        int status;
        pid_t pid = waitpid(-1, &status, 0);
        if (pid < 0 && errno == EINTR)
            continue;
        if (pid < 0)
            report_and_exit(control, 126);
        if (pid == job)
            report_and_exit(control, WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status));
    }

failed: {
    int saved = errno;
    char reason[300];
    describe(reason, sizeof reason, step, saved);
    snprintf(text, sizeof text, "jobmesh: cannot start the job: %s\n", reason);
    write_all(err, text);
    report_and_exit(control, 126);
}
}

/* ---- the spawner ---- */

/* One job: its init cloned into new pid, mount, ipc and uts namespaces, its pid sent to the agent; the message
 * zeroed. */
static void start(size_t size, const int fds[REQUEST_FDS]) {
    int control = fds[0];
    /* Its own uts namespace too (the slot's hostname, which no job can change, but never one another job had). */
    long flags = CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | SIGCHLD;
    long init = syscall(SYS_clone, flags, NULL, NULL, NULL, NULL);
    if (init == 0)
        job_init(size, control, fds[1], fds[2], fds[3]);
    explicit_bzero(message, size); /* the job's environment stays in no buffer of ours */
    if (init < 0) {
        char text[200];
        describe(text, sizeof text, "cannot start the job's init", errno);
        send_error(control, text);
    } else {
        send_number(control, 'P', (uint32_t)init);
    }
}

/* Whether the agent has closed its end (after a read of 0 bytes: an empty message reads so too). */
static int agent_gone(void) {
    struct pollfd p = {request_socket, POLLRDHUP, 0};
    return poll(&p, 1, 0) > 0 && (p.revents & (POLLHUP | POLLRDHUP | POLLERR));
}

static void serve(void) {
    union {
        char space[CMSG_SPACE(REQUEST_FDS * sizeof(int))];
        struct cmsghdr align;
    } control;
    for (;;) {
        /* The size first (MSG_PEEK | MSG_TRUNC: the whole message's). */
        char probe;
        ssize_t size = recv(request_socket, &probe, 1, MSG_PEEK | MSG_TRUNC);
        if (size < 0) {
            if (errno == EINTR)
                continue;
            die("recv");
        }
        struct iovec iov = {message, size > (ssize_t)MAX_REQUEST ? MAX_REQUEST + 1 : (size_t)size};
        struct msghdr msg = {0};
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.space;
        msg.msg_controllen = sizeof control.space;
        ssize_t received = recvmsg(request_socket, &msg, MSG_CMSG_CLOEXEC);
        if (received < 0) {
            if (errno == EINTR)
                continue;
            die("recvmsg");
        }
        int fds[REQUEST_FDS + 1];
        int n_fds = 0;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS || c->cmsg_len < CMSG_LEN(0))
                continue;
            size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            for (size_t i = 0; i < count; i++) {
                int fd;
                memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
                if (n_fds < REQUEST_FDS + 1)
                    fds[n_fds++] = fd;
                else
                    close(fd);
            }
        }
        if (received == 0 && n_fds == 0 && agent_gone())
            return;
        if ((msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) || n_fds != REQUEST_FDS || (size_t)received != iov.iov_len) {
            explicit_bzero(message, iov.iov_len);
            if (n_fds > 0)
                send_error(fds[0], "a request without its four fds, or cut short");
        } else {
            start((size_t)received, fds);
        }
        for (int i = 0; i < n_fds; i++)
            close(fds[i]);
    }
}

static int parse_fd(const char *text) {
    char *end;
    errno = 0;
    long fd = strtol(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || fd < 0 || fd > INT_MAX)
        return -1;
    return (int)fd;
}

static void read_seccomp(int fd) {
    size_t size = 0, capacity = 4096;
    unsigned char *program = malloc(capacity);
    if (program == NULL)
        die("seccomp program");
    for (;;) {
        if (size == capacity) {
            if (capacity >= (size_t)BPF_MAXINSNS * sizeof(struct sock_filter)) {
                errno = EFBIG;
                die("seccomp program");
            }
            capacity *= 2;
            if ((program = realloc(program, capacity)) == NULL)
                die("seccomp program");
        }
        ssize_t n = read(fd, program + size, capacity - size);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            die("read the seccomp program");
        if (n == 0)
            break;
        size += (size_t)n;
    }
    close(fd);
    if (size == 0 || size % sizeof(struct sock_filter) != 0 || size / sizeof(struct sock_filter) > BPF_MAXINSNS) {
        errno = EINVAL;
        die("seccomp program");
    }
    seccomp_program.len = (unsigned short)(size / sizeof(struct sock_filter));
    seccomp_program.filter = (struct sock_filter *)program;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: jobmesh-spawner <socket fd> <seccomp fd> [<hidden dir>...]\n");
        return 2;
    }
    const char *self = strrchr(argv[0], '/');
    if (strncmp(argv[0], "/proc/self/fd/", 14) == 0 && self != NULL) {
        int program_fd = parse_fd(self + 1); /* the memfd this program was exec'd from */
        if (program_fd > 2 && fcntl(program_fd, F_GETFD) >= 0)
            close(program_fd);
    }
    prctl(PR_SET_NAME, "jobmesh-spawner", 0, 0, 0); /* not "8", after the fd it was exec'd from; best effort */
    request_socket = parse_fd(argv[1]);
    int seccomp_fd = parse_fd(argv[2]);
    if (request_socket < 0 || seccomp_fd < 0 || fcntl(request_socket, F_SETFD, FD_CLOEXEC) != 0) {
        errno = EBADF;
        die("the socket and seccomp fds");
    }
    hidden_dirs = argv + 3;
    hidden_count = argc - 3;
    read_seccomp(seccomp_fd);
    FILE *last = fopen("/proc/sys/kernel/cap_last_cap", "re");
    int cap_last = -1;
    if (last == NULL || fscanf(last, "%d", &cap_last) != 1 || cap_last < 0 || cap_last > 63)
        die("/proc/sys/kernel/cap_last_cap");
    fclose(last);
    int pipe_fds[2];
    if (pipe2(pipe_fds, O_CLOEXEC) != 0 || fcntl(pipe_fds[0], F_SETFL, O_NONBLOCK) != 0)
        die("lifeline pipe");
    lifeline = pipe_fds[0];
    lifeline_end = pipe_fds[1];
    /* The jobs' mounts never propagate back here (nor to the next job): every mount of ours is private. */
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0)
        die("make the mounts private");
    /* An empty bounding set, inherited by every job; then only what the spawner needs stays (no CAP_SETPCAP). */
    for (int cap = 0; cap <= cap_last; cap++)
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0)
            die("drop from the bounding set");
    if (set_capabilities(SPAWNER_KEEPS) != 0)
        die("capset");
    signal(SIGCHLD, SIG_IGN); /* the jobs' inits are reaped by the kernel */
    signal(SIGINT, SIG_IGN);  /* a ^C at the agent's terminal is for the agent */
    signal(SIGPIPE, SIG_IGN); /* as Python's spawner: the job gets them back at their default */
    signal(SIGXFSZ, SIG_IGN);
    serve();
    return 0;
}
