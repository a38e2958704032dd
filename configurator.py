"""
Overrides a script's settings from the command line. A script keeps its settings as
module-level globals with defaults (a block at its top), then calls

    config = configurator.configure(globals())

which, for each command-line argument in order:
  config/some_file.py   runs that file in the script's globals (plain assignments)
  --key=value           sets one setting; the value is parsed as a Python literal
                        (ast.literal_eval), and taken as a plain string when it is not one
  --help                lists every setting with its default and comment, then exits

A setting keeps the type of its default (an int is accepted where a float is expected, and
True or False where a string such as 'auto' is: they become 'True' and 'False').
An unknown key, a value of the wrong type or a missing config file stops the script with one
line saying what is wrong. configure() returns the resolved settings as a dict, which the
scripts store in their checkpoints.
"""

import ast
import difflib
import inspect
import io
import os
import sys
import traceback
import tokenize

SETTING_TYPES = (bool, int, float, str)


def settings_of(scope):
    """The settings of a script: its lower-case globals holding a bool, int, float or str
    (names in CAPITALS are constants, such as an imported DATA_DIR)."""
    return {k: v for k, v in scope.items()
            if not k.startswith('_') and not k.isupper() and type(v) in SETTING_TYPES}


def fail(message):
    """End the script with one line on stderr and exit status 1 (a user's mistake: no traceback)."""
    sys.exit(f"error: {message}")


def unknown_key_message(key, known, where):
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else "; see --help for the list"
    return f"unknown setting '{key}' {where}{hint}"


def coerce(key, value, default, where):
    """Return value converted to the type of default, or stop with a message saying
    why it can't be."""
    want = type(default)
    if want is float and type(value) is int:
        return float(value)  # --learning_rate=1 means 1.0
    if want is str and type(value) is bool:
        return str(value)  # compile = True in a config file, for a setting whose default is 'auto'
    if type(value) is not want:
        example = {bool: 'True or False', int: 'an integer such as 100',
                   float: 'a number such as 3e-4', str: 'a string'}[want]
        fail(f"{key} must be {want.__name__} ({example}), got {value!r} ({type(value).__name__}) "
             f"{where}")
    return value


def parse_value(raw, default):
    """Parse the text after '=' as a Python literal; a str setting takes the text as it is."""
    if isinstance(default, str):
        try:
            value = ast.literal_eval(raw)
            return value if isinstance(value, str) else raw  # --start="'hi'" or --start=hi
        except (ValueError, SyntaxError):
            return raw
    if isinstance(default, bool) and raw.lower() in ('true', 'false'):
        return raw.lower() == 'true'  # forgive --compile=false
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def run_config_file(path, scope):
    """Run a config file in the script's globals. It is compiled with its real path, so a
    debugger can stop in it and a traceback shows its lines."""
    if not os.path.isfile(path):
        fail(f"config file '{path}' not found (settings are passed as --key=value)")
    known = settings_of(scope)
    before = dict(scope)
    with open(path, encoding='utf-8') as f:
        source = f.read()
    try:
        code = compile(source, path, 'exec')
    except SyntaxError as e:
        fail(f"{path}:{e.lineno}: {e.msg} (a config file is Python: lines of key = value)")
    try:
        exec(code, scope)
    except Exception as e:
        # a mistake in the file (a misspelt name, ...): its line, not a traceback
        lineno = [f.lineno for f in traceback.extract_tb(e.__traceback__)
                  if f.filename == path][-1:] or ['?']
        fail(f"{path}:{lineno[0]}: {type(e).__name__}: {e}")
    # check every name the file set, whatever its value (None, a tuple, ...); a file may still
    # import modules, define helpers and use _private names
    for key, value in scope.items():
        if key.startswith('_') or key.isupper() or inspect.ismodule(value) or callable(value):
            continue
        where = f"in {path}"
        if key in known:
            scope[key] = coerce(key, value, known[key], where)
        elif key not in before or before[key] is not value:
            fail(unknown_key_message(key, known, where))


def comments_of(script_path):
    """Map each top-level 'key = value  # comment' of a script to its comment, for --help."""
    with open(script_path, encoding='utf-8') as f:
        source = f.read()
    comment_at_line = {tok.start[0]: tok.string.lstrip('# ')
                       for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                       if tok.type == tokenize.COMMENT}
    comments = {}
    # the first assignment of a name: the settings block comes first
    for node in ast.parse(source).body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)):
            comments.setdefault(node.targets[0].id, comment_at_line.get(node.lineno, ''))
    return comments


def print_help(scope, defaults):
    script = scope.get('__file__', 'script.py')
    comments = comments_of(script) if os.path.isfile(script) else {}
    name = os.path.basename(script)
    print(f"usage: python {name} [config/file.py ...] [--key=value ...]\n\n"
          f"settings (default, then what it is):")
    width = max((len(f"{k} = {v!r}") for k, v in defaults.items()), default=0)
    for key, value in defaults.items():
        print(f"  {f'{key} = {value!r}':<{width}}  {comments.get(key, '')}".rstrip())


def configure(scope, argv=None):
    """Apply config files and --key=value flags (argv, default sys.argv[1:]) to scope, a script's
    globals(). Returns the resolved settings as a dict."""
    argv = sys.argv[1:] if argv is None else argv
    defaults = settings_of(scope)
    if any(arg in ('-h', '--help') for arg in argv):
        print_help(scope, defaults)
        sys.exit(0)
    for arg in argv:
        if not arg.startswith('--'):
            run_config_file(arg, scope)
            continue
        key, eq, raw = arg[2:].partition('=')
        if not eq:
            fail(f"'{arg}' has no value: write --{key}=VALUE")
        if key not in defaults:
            fail(unknown_key_message(key, defaults, f"in {arg}"))
        scope[key] = coerce(key, parse_value(raw, defaults[key]), defaults[key], f"in {arg}")
    return settings_of(scope)


def check_ranges(settings, positive=(), non_negative=()):
    """Stop with one line at the first of positive that is below 1, or of non_negative below 0."""
    for names, low, what in ((positive, 1, 'be at least 1'), (non_negative, 0, 'not be negative')):
        for name in names:
            if settings[name] < low:
                fail(f"{name} must {what}, not {settings[name]}")
