"""
Tests of configurator.configure(scope, argv): --key=value flags and config files applied in
order, types kept, and every user mistake stopping with one line that names the problem.
The scope is built by hand, like a script's globals(); one test runs the real train.py.
"""

import os
import subprocess
import sys

import pytest

import configurator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository

SCRIPT = """\
batch_size = 12  # sequences per micro-batch
learning_rate = 6e-4  # peak learning rate
compile = False  # torch.compile the model
dataset = 'openwebtext'  # data/<dataset>/
"""


@pytest.fixture
def scope(tmp_path):
    """A script's globals: its settings, plus __file__ pointing at a script that defines them."""
    script = tmp_path / 'script.py'
    script.write_text(SCRIPT)
    return {'__file__': str(script), 'batch_size': 12, 'learning_rate': 6e-4, 'compile': False,
            'dataset': 'openwebtext'}


def config_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def stops(scope, argv):
    """Run configure, expecting it to stop; return the one-line message it exits with."""
    with pytest.raises(SystemExit) as excinfo:
        configurator.configure(scope, argv)
    message = excinfo.value.code
    assert isinstance(message, str), f"expected a message, got exit code {message!r}"
    assert '\n' not in message.strip(), message
    return message


# -----------------------------------------------------------------------------
# what is accepted


def test_no_arguments_returns_the_defaults(scope):
    """With no arguments nothing changes, and the settings come back as a dict (no __file__)."""
    assert configurator.configure(scope, []) == {'batch_size': 12, 'learning_rate': 6e-4, 'compile': False,
                                                 'dataset': 'openwebtext'}


def test_flags_override_with_the_right_types(scope):
    """--key=value sets each setting in the scope, parsed to the type of its default."""
    config = configurator.configure(scope, ['--batch_size=32', '--learning_rate=1e-3', '--compile=True',
                                            '--dataset=shakespeare_char'])
    expected = {'batch_size': 32, 'learning_rate': 1e-3, 'compile': True, 'dataset': 'shakespeare_char'}
    assert config == expected
    for key, value in expected.items():
        assert scope[key] == value and type(scope[key]) is type(value), key


def test_int_is_accepted_for_a_float(scope):
    """--learning_rate=1 means 1.0: a float, not an int."""
    configurator.configure(scope, ['--learning_rate=1'])
    assert scope['learning_rate'] == 1.0 and type(scope['learning_rate']) is float


@pytest.mark.parametrize('raw, value', [('false', False), ('False', False), ('true', True), ('True', True)])
def test_bool_in_either_case(scope, raw, value):
    """--compile=false is forgiven, as is --compile=False."""
    scope['compile'] = not value  # so that the flag has to change it
    configurator.configure(scope, [f'--compile={raw}'])
    assert scope['compile'] is value


@pytest.mark.parametrize('raw, value', [('123', '123'), ('1e-3', '1e-3'), ('True', 'True'),
                                        ("'quoted'", 'quoted'), ('a=b', 'a=b'), ('', '')])
def test_str_setting_keeps_the_text(scope, raw, value):
    """A str setting keeps text that looks like a number or a bool; quotes may be used."""
    configurator.configure(scope, [f'--dataset={raw}'])
    assert scope['dataset'] == value and type(scope['dataset']) is str


def test_true_or_false_for_a_text_setting(scope, tmp_path):
    """A setting whose default is text such as 'auto' (train.py's compile) takes True or False,
    from a flag or a config file, as 'True' or 'False'."""
    scope['compile'] = 'auto'
    assert configurator.configure(scope, ['--compile=False'])['compile'] == 'False'
    assert configurator.configure(scope, [config_file(tmp_path, 'c.py', 'compile = True\n')])['compile'] == 'True'


def test_config_files_and_flags_apply_in_order(scope, tmp_path):
    """Config files run in order, then a later flag overrides them; a later file overrides an earlier flag."""
    first = config_file(tmp_path, 'first.py', "batch_size = 1\ndataset = 'first'\n")
    second = config_file(tmp_path, 'second.py', "batch_size = 2\nlearning_rate = 1  # an int, for a float\n")
    config = configurator.configure(scope, [first, second, '--batch_size=3'])
    assert config == {'batch_size': 3, 'learning_rate': 1.0, 'compile': False, 'dataset': 'first'}
    assert type(scope['learning_rate']) is float

    scope.update(batch_size=12, dataset='openwebtext')
    configurator.configure(scope, ['--batch_size=3', second])
    assert scope['batch_size'] == 2


def test_config_file_may_compute_and_import(scope, tmp_path):
    """A config file is Python: it can import modules and compute values from other settings."""
    path = config_file(tmp_path, 'computed.py', "import math\nbatch_size = batch_size * 2\n"
                                                "learning_rate = math.sqrt(4e-6)\n")
    config = configurator.configure(scope, [path])
    assert config['batch_size'] == 24 and config['learning_rate'] == pytest.approx(2e-3)
    assert 'math' not in config


# -----------------------------------------------------------------------------
# what stops the script, with one line naming the problem


def test_unknown_key_names_the_closest_setting(scope):
    """A typo stops with the key and the setting it probably meant."""
    message = stops(scope, ['--batchsize=4'])
    assert 'batchsize' in message and "'batch_size'" in message, message
    assert scope['batch_size'] == 12


def test_unknown_key_far_from_any_setting(scope):
    """A key like nothing known still stops, naming the key."""
    message = stops(scope, ['--zzz=4'])
    assert 'zzz' in message, message


def test_config_file_setting_an_unknown_key(scope, tmp_path):
    """A config file that sets an unknown key stops, naming the key, the closest setting and the file."""
    path = config_file(tmp_path, 'typo.py', "batch_size = 4\nlerning_rate = 1e-3\n")
    message = stops(scope, [path])
    assert 'lerning_rate' in message and "'learning_rate'" in message and path in message, message


def test_config_file_with_a_wrong_type(scope, tmp_path):
    """A config file that gives a setting a value of the wrong type stops, naming the key and the file."""
    path = config_file(tmp_path, 'wrong.py', "batch_size = 'many'\n")
    message = stops(scope, [path])
    assert 'batch_size' in message and path in message, message


@pytest.mark.parametrize('text, key', [("batch_size = None\n", 'batch_size'),
                                       ("betas = (0.9, 0.95)\n", 'betas')])
def test_config_file_values_of_any_type_are_checked(scope, tmp_path, text, key):
    """A config file setting None, or an unknown key to a tuple, is caught too, not only bool/int/float/str."""
    message = stops(scope, [config_file(tmp_path, 'odd.py', text)])
    assert key in message, message


def test_help_with_no_settings(tmp_path, capsys):
    """--help still works for a script with no settings."""
    script = tmp_path / 'empty.py'
    script.write_text("import os\n")
    with pytest.raises(SystemExit) as excinfo:
        configurator.configure({'__file__': str(script)}, ['--help'])
    assert excinfo.value.code == 0 and 'usage' in capsys.readouterr().out


@pytest.mark.parametrize('arg', ['--batch_size=abc', '--batch_size=1.5', '--batch_size=True',
                                 '--compile=1', '--learning_rate=fast'])
def test_wrong_type_names_the_key(scope, arg):
    """A value of the wrong type (a float or a bool for an int, an int for a bool, text for a number)
    stops, naming the key."""
    key = arg[2:].split('=')[0]
    message = stops(scope, [arg])
    assert key in message, message


def test_missing_config_file_names_the_file(scope, tmp_path):
    """A config file that does not exist stops, naming the file."""
    missing = str(tmp_path / 'no_such_config.py')
    message = stops(scope, [missing])
    assert missing in message, message


@pytest.mark.parametrize('arg', ['--batch_size', '--dataset'])
def test_flag_without_value(scope, arg):
    """A flag with no '=' stops and shows how to write it (a str setting does not silently become '')."""
    message = stops(scope, [arg])
    assert f'{arg}=' in message, message
    assert scope['dataset'] == 'openwebtext'


def test_help_lists_every_setting(scope, capsys):
    """--help prints each setting with its default and the comment from the script, and exits 0."""
    with pytest.raises(SystemExit) as excinfo:
        configurator.configure(scope, ['--batch_size=7', '--help'])
    assert excinfo.value.code in (0, None)
    out = capsys.readouterr().out
    lines = out.splitlines()
    for key, default, comment in [('batch_size', '12', 'sequences per micro-batch'),
                                  ('learning_rate', '0.0006', 'peak learning rate'),
                                  ('compile', 'False', 'torch.compile the model'),
                                  ('dataset', "'openwebtext'", 'data/<dataset>/')]:
        line = [line for line in lines if line.split() and line.split()[0] == key]
        assert len(line) == 1, (key, out)
        assert default in line[0] and line[0].rstrip().endswith(comment), line[0]
    assert scope['batch_size'] == 12  # nothing was applied


# -----------------------------------------------------------------------------
@pytest.mark.parametrize('text, fragments', [
    ("batch_size = 4\nlearning_rate = 1e-3 *\n", [':2:', 'invalid syntax']),
    ("batch_size = 4\n\nlearning_rate = base_lr / 10\n", [':3:', 'NameError', 'base_lr']),
])
def test_config_file_mistakes_name_the_line(scope, tmp_path, text, fragments):
    """A syntax error or a failing line in a config file: one line with the file and line number."""
    path = config_file(tmp_path, 'bad.py', text)
    message = stops(scope, [path])
    assert path in message and all(f in message for f in fragments), message


# the real script


def test_train_py_typo_is_one_line(tmp_path):
    """python train.py --lerning_rate=1: exit 1, one line on stderr naming learning_rate, no traceback."""
    p = subprocess.run([sys.executable, 'train.py', '--lerning_rate=1'], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    assert 'Traceback' not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert 'lerning_rate' in lines[0] and "'learning_rate'" in lines[0], lines[0]


def settings_scope(script):
    """The globals of a script's settings block, as the script has them when it calls configure()."""
    with open(os.path.join(ROOT, script), encoding='utf-8') as f:
        source = f.read()
    scope = {'__file__': os.path.join(ROOT, script), '__name__': 'settings'}
    exec(source[:source.index('config = configurator.configure(globals())')], scope)
    return scope

