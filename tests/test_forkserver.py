"""
How the tests run the scripts fast: python <script> <args> in a process forked from one that has
already imported torch. Every train.py the tests start would otherwise spend ~2 of its ~3 s importing
torch (~1 s) and torch._dynamo (~1 s more, which torch.optim imports when the first optimizer is
built); the suite starts a few hundred of them.

The server is this file run as a script (`python test_forkserver.py`), one per pytest worker: a fresh
interpreter that imports torch, torch._dynamo and numpy, and no file of this project. For each request
it forks; the child changes to the request's folder, takes its environment, points file descriptors
0, 1 and 2 at the request's files, and runs the script as __main__ (runpy), as `python script.py`
would: its own sys.argv, sys.path[0] its folder (so the copy of the project there is what imports),
sys.excepthook for an uncaught exception, SystemExit's code, atexit's handlers and the interpreter's
own exit. The child is a real process: its exit status, pid and signals are its own.

What a fork cannot change, a real subprocess is for: ScriptRunner.run falls back to subprocess.run
when the caller gives env=, or when a variable read as the interpreter or torch starts (PYTHONPATH,
OMP_NUM_THREADS, MALLOC_*: AT_START_UP) is not what the server started with: it would not take effect
in a fork. Any other variable (HF_ENDPOINT, say) reaches the child's os.environ, before it imports the
library that reads it. torchrun and the tests that signal a run use subprocess
directly.
"""

import _io
import json
import os
import select
import signal
import subprocess
import sys
import tempfile

def serve(requests, replies):
    """The server's loop: one JSON request a line on the file descriptor requests; the child's pid, then its
    exit status, a line each on replies. Ends at the end of requests (the pytest worker has exited)."""
    import numpy  # noqa: F401  (what every script imports: paid once, here)
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401  (what building an optimizer imports)
    source = os.fdopen(requests, 'r', encoding='utf-8')
    sink = os.fdopen(replies, 'w', encoding='utf-8', buffering=1)
    for line in source:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            source.close()
            sink.close()
            run_child(**request)  # does not return
        sink.write(f"{pid}\n")
        _, status = os.waitpid(pid, 0)
        sink.write(f"{os.waitstatus_to_exitcode(status)}\n")


def run_child(script, args, cwd, env, stdin, stdout, stderr):
    """In the forked child: become `python script *args` run in cwd with env, and exit as it would."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a fresh interpreter
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path, mode in ((0, stdin, os.O_RDONLY), (1, stdout, os.O_WRONLY), (2, stderr, os.O_WRONLY)):
        f = os.open(path, mode)
        os.dup2(f, fd)
        os.close(f)
    # new streams on the new descriptors, as Python makes them at start-up for pipes (UTF-8 here)
    sys.stdin = open(0, 'r', encoding='utf-8', closefd=False)
    sys.stdout = open(1, 'w', encoding='utf-8', closefd=False)
    sys.stderr = open(2, 'w', encoding='utf-8', errors='backslashreplace', buffering=1, closefd=False)
    sys.argv, path = [script, *args], os.path.abspath(script)
    sys.path[0] = os.path.dirname(path)
    import runpy
    code = 0
    try:
        runpy.run_path(path, run_name='__main__')
    except SystemExit as e:  # sys.exit(code), configurator.fail: Python's rules for the code
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException as e:  # what Python does with an uncaught exception: the script's excepthook, status 1
        tb = e.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != path:  # from the script's frame on, as Python
            tb = tb.tb_next
        e = e.with_traceback(tb or e.__traceback__)
        sys.excepthook(type(e), e, e.__traceback__)
        code = 1
    exit_now(code)


def exit_now(code):
    """End the child as the interpreter's exit would, less its teardown of every module, which with torch and
    torch._dynamo loaded takes 1.3 s of the 1.4 s a tiny train.py run costs here: non-daemon threads joined,
    atexit's handlers run (weakref.finalize's, multiprocessing's), every open file flushed (files a script
    left open are written when their objects are freed at exit), then os._exit."""
    import gc
    import threading
    threading._shutdown()  # what the interpreter's exit does first: wait for non-daemon threads
    import atexit
    atexit._run_exitfuncs()
    for f in gc.get_objects():  # type(), not isinstance: a lazy module object warns when its class is read
        if issubclass(type(f), _io._IOBase) and not f.closed:
            try:
                f.flush()
            except (OSError, ValueError):  # a file the script broke, a pipe closed: as an exit would
                pass
    os._exit(code)


# variables read when the interpreter, torch or its libraries start, which a fork cannot apply afresh
AT_START_UP = ('PYTHON', 'OMP_', 'MKL_', 'KMP_', 'GOMP_', 'MALLOC_', 'LD_', 'TORCH', 'CUDA', 'GLIBC')
# ...except this one, which torch.compile itself sets in the process that first compiles (a test that compiles
# in the pytest worker) and reads only when it compiles. Counted, it sent every later run of the suite to a
# fresh interpreter: 235 of 243 runs, and the suite took 434 s instead of 191 s.
READ_LATER = ('TORCHINDUCTOR_CACHE_DIR',)


def at_start_up(env):
    return {k: v for k, v in env.items() if k.startswith(AT_START_UP) and k not in READ_LATER}


class ScriptRunner:
    """runner.run(cwd, script, args) -> subprocess.CompletedProcess, like subprocess.run([sys.executable,
    script, *args], cwd=cwd, capture_output=True, text=True): through the fork server where it can."""

    def __init__(self):
        self.server, self.env = None, dict(os.environ)  # the server's: a fork stands in for its start-up part

    def start(self):
        to_server, self.requests = os.pipe()
        self.replies, from_server = os.pipe()
        self.server = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(to_server), str(from_server)],
                                       pass_fds=(to_server, from_server), env=self.env, stdin=subprocess.DEVNULL)
        os.close(to_server)
        os.close(from_server)
        # unbuffered: a buffered reader could take the status line with the pid's, out of select()'s sight
        self.reply_file = os.fdopen(self.replies, 'rb', buffering=0)

    def read_reply(self, timeout):
        if not select.select([self.reply_file], [], [], timeout)[0]:
            return None
        line = self.reply_file.readline()
        if not line:
            raise RuntimeError(f"the test fork server exited (status {self.server.poll()})")
        return int(line)

    def run(self, cwd, script, args, timeout=300, input=None, env=None):
        argv = [sys.executable, script, *args]
        if env is not None or at_start_up(os.environ) != at_start_up(self.env):  # a fresh interpreter reads them
            p = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, input=input, env=env)
            p.forked = False
            return p
        if self.server is None or self.server.poll() is not None:
            self.start()
        with tempfile.TemporaryDirectory() as tmp:
            paths = {name: os.path.join(tmp, name) for name in ('stdin', 'stdout', 'stderr')}
            with open(paths['stdin'], 'w', encoding='utf-8') as f:
                f.write(input or '')
            open(paths['stdout'], 'w').close()
            open(paths['stderr'], 'w').close()
            request = dict(script=script, args=list(args), cwd=str(cwd), env=dict(os.environ), **paths)
            os.write(self.requests, (json.dumps(request) + '\n').encode())
            pid = self.read_reply(None)  # sent as soon as it has forked
            status = self.read_reply(timeout)
            if status is None:  # as subprocess.run: kill it, then say so
                os.kill(pid, signal.SIGKILL)
                self.read_reply(None)
                raise subprocess.TimeoutExpired(argv, timeout)
            with open(paths['stdout'], encoding='utf-8') as out, open(paths['stderr'], encoding='utf-8') as err:
                p = subprocess.CompletedProcess(argv, status, out.read(), err.read())
                p.forked = True  # (for test_forkserver.py: which way it ran)
                return p


PROBE = '''
import atexit, os, sys
import helper  # from the script's own folder
atexit.register(lambda: print('atexit ran'))
print('argv', sys.argv[1:], 'cwd', os.path.basename(os.getcwd()), 'helper', helper.WHERE, 'stdin', sys.stdin.read())
print('to stderr: é', file=sys.stderr)
print('PYTHONPATH seen:', any(p.endswith('elsewhere') for p in sys.path), 'SOME_SETTING', os.environ.get('SOME_SETTING'))
left_open = open('left_open.txt', 'w')  # never closed: the exit must still write it
left_open.write('written at exit')
how = sys.argv[1]
if how == 'exit3':
    sys.exit(3)
if how == 'message':
    sys.exit('stopped: a message')
if how == 'raise':
    raise ValueError('boom')
if how == 'hook':
    sys.excepthook = lambda kind, e, tb: print(f'hook saw {kind.__name__}', file=sys.stderr)
    raise MemoryError
if how == 'kill':
    sys.stdout.flush()
    os.kill(os.getpid(), 9)
'''


def test_a_forked_run_is_what_a_subprocess_gives(tmp_path, monkeypatch):
    """The same script through the fork server and through subprocess.run: the same exit status, stdout and
    stderr, for a normal end, sys.exit with a code or a message, an uncaught exception (and the script's
    own excepthook) and a death by signal; its argv, folder, stdin, local imports and atexit handlers."""
    (tmp_path / 'probe.py').write_text(PROBE, encoding='utf-8')
    (tmp_path / 'helper.py').write_text("WHERE = 'probe folder'\n", encoding='utf-8')
    runner = ScriptRunner()
    for how in ('ok', 'exit3', 'message', 'raise', 'hook', 'kill'):
        forked = runner.run(tmp_path, 'probe.py', [how, 'x y'], input='piped in')
        wrote = (tmp_path / 'left_open.txt').read_text()
        real = subprocess.run([sys.executable, 'probe.py', how, 'x y'], cwd=tmp_path, capture_output=True, text=True,
                              input='piped in', timeout=60)
        assert forked.forked, how  # under pytest, whose PYTEST_CURRENT_TEST changes from test to test
        assert (forked.returncode, forked.stdout, forked.stderr) == (real.returncode, real.stdout, real.stderr), how
        assert wrote == (tmp_path / 'left_open.txt').read_text() == ('' if how == 'kill' else 'written at exit')
    assert real.returncode == -9 and "helper probe folder stdin piped in" in real.stdout
    assert runner.run(tmp_path, 'probe.py', ['exit3']).returncode == 3  # the server serves one run after another
    pid = runner.server.pid
    monkeypatch.setenv('SOME_SETTING', 'seen')  # read when the script runs: the fork has it
    q = runner.run(tmp_path, 'probe.py', ['ok'])
    assert q.forked and 'SOME_SETTING seen' in q.stdout
    monkeypatch.setenv('TORCHINDUCTOR_CACHE_DIR', str(tmp_path / 'inductor'))  # as torch.compile sets it in-process
    assert runner.run(tmp_path, 'probe.py', ['ok']).forked
    monkeypatch.setenv('PYTHONPATH', str(tmp_path / 'elsewhere'))  # read at start-up: a fork would miss it
    p = runner.run(tmp_path, 'probe.py', ['ok'])  # so a fresh interpreter runs it, and the server stays
    assert not p.forked and p.returncode == 0 and 'PYTHONPATH seen: True' in p.stdout and runner.server.pid == pid


if __name__ == '__main__':
    serve(int(sys.argv[1]), int(sys.argv[2]))
