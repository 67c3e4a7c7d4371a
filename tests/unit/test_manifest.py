"""The process manifest, herder.toml: what it accepts, and a one-line error naming the field for the rest."""

from __future__ import annotations

from pathlib import Path

import pytest

from herder.packaging.manifest import (
    Manifest,
    check_name,
    check_version,
    load_manifest,
    parse_manifest,
)
from herder.protocol.errors import BadRequest
from herder.protocol.packages import EntryKind, EntryPoint, PackagePublish

HEAD = 'name = "hello"\nversion = "1.0.0"\n'


def manifest(body: str, head: str = HEAD) -> Manifest:
    return parse_manifest(head + body)


def error_of(text: str) -> str:
    with pytest.raises(BadRequest) as caught:
        parse_manifest(text)
    message = caught.value.message
    assert "\n" not in message, message
    assert message.startswith("herder.toml: "), message
    return message


def test_a_python_entry() -> None:
    parsed = manifest('description = "Greets whoever the input names"\n[entry]\npython = "hello:main"\n')
    assert parsed == Manifest(
        name="hello",
        version="1.0.0",
        description="Greets whoever the input names",
        entry=EntryPoint(kind=EntryKind.PYTHON, target="hello:main"),
    )
    assert manifest('[entry]\npython = "pkg.sub.mod:run_it"\n').entry.target == "pkg.sub.mod:run_it"


def test_a_command_entry_as_words_or_as_one_string() -> None:
    words = manifest('[entry]\ncommand = ["bash", "run.sh", "--fast"]\n').entry
    assert (words.kind, words.target, words.args) == (EntryKind.COMMAND, "bash", ["run.sh", "--fast"])
    split = manifest("[entry]\ncommand = \"bash run.sh 'two words'\"\n").entry
    assert (split.target, split.args) == ("bash", ["run.sh", "two words"])


def test_a_robot_entry_and_no_description() -> None:
    parsed = manifest('[entry]\nrobot = "suites/hello.robot"\n')
    assert parsed.entry == EntryPoint(kind=EntryKind.ROBOT, target="suites/hello.robot")
    assert parsed.description == ""


def test_what_a_manifest_holds_is_what_a_publish_request_takes() -> None:
    parsed = manifest('description = "d"\n[entry]\ncommand = ["run"]\n')
    request = PackagePublish(
        process=parsed.name,
        version=parsed.version,
        sha256="0" * 64,
        size=1,
        entry=parsed.entry,
        description=parsed.description,
    )
    assert request.entry == parsed.entry


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ('version = "1.0.0"\n[entry]\npython = "a:b"\n', ["'name' is missing"]),
        ('name = "hello"\n[entry]\npython = "a:b"\n', ["'version' is missing"]),
        (
            'name = "my process"\nversion = "1"\n[entry]\npython = "a:b"\n',
            ["'name' must be 1-64 letters, digits, '-' or '_' (got 'my process')"],
        ),
        ('name = "-x"\nversion = "1"\n[entry]\npython = "a:b"\n', ["'name' must start with a letter or digit"]),
        (f'name = "{"x" * 65}"\nversion = "1"\n[entry]\npython = "a:b"\n', ["'name' must be 1-64"]),
        ('name = 3\nversion = "1"\n[entry]\npython = "a:b"\n', ["'name' must be a string in quotes"]),
        ('name = "hello"\nversion = 1.0\n[entry]\npython = "a:b"\n', ["'version' must be a string", "(got 1.0)"]),
        (
            'name = "hello"\nversion = "1.0 beta"\n[entry]\npython = "a:b"\n',
            ["'version' must be 1-64 letters, digits, '.', '+', '-' or '_'", "'1.0 beta'"],
        ),
        ('name = "hello"\nversion = ".1"\n[entry]\npython = "a:b"\n', ["'version' must start with a letter or digit"]),
        (HEAD + "description = 5\n[entry]\npython = 'a:b'\n", ["'description' must be a string"]),
        (HEAD + f"description = '{'d' * 1001}'\n[entry]\npython = 'a:b'\n", ["'description' is longer than 1000"]),
        (HEAD + 'verison = "2"\n[entry]\npython = "a:b"\n', ["unknown key 'verison'", "did you mean 'version'"]),
        (HEAD + "[entyr]\npython = 'a:b'\n", ["unknown key 'entyr'", "did you mean 'entry'"]),
        (HEAD, ["[entry] is missing"]),
        (HEAD + 'entry = "hello:main"\n', ["'entry' must be a table"]),
        (HEAD + "[entry]\n", ["[entry] needs exactly one of python, command or robot"]),
        (
            HEAD + '[entry]\npython = "a:b"\ncommand = ["x"]\n',
            ["[entry] needs exactly one of python, command or robot (got python and command)"],
        ),
        (HEAD + '[entry]\npyhton = "a:b"\n', ["[entry] has an unknown key 'pyhton'", "did you mean 'python'"]),
        (HEAD + '[entry]\npython = "hello"\n', ["[entry] python must read module:function", "(got 'hello')"]),
        (HEAD + '[entry]\npython = "hello:"\n', ["[entry] python must read module:function"]),
        (HEAD + '[entry]\npython = "my-mod:main"\n', ["[entry] python must read module:function"]),
        (HEAD + '[entry]\npython = "a..b:main"\n', ["[entry] python must read module:function"]),
        (HEAD + "[entry]\npython = 1\n", ["[entry] python must read module:function"]),
        (HEAD + "[entry]\ncommand = []\n", ["[entry] command is empty"]),
        (HEAD + '[entry]\ncommand = ""\n', ["[entry] command is empty"]),
        (HEAD + '[entry]\ncommand = ["bash", 3]\n', ["[entry] command must be a list of words"]),
        (HEAD + '[entry]\ncommand = "bash \'unclosed"\n', ["[entry] command cannot be split into words"]),
        (HEAD + "[entry]\nrobot = ''\n", ["[entry] robot must name a suite"]),
        (HEAD + "[entry]\nrobot = '/etc/x.robot'\n", ["[entry] robot must be a path inside the package"]),
        (HEAD + "[entry]\nrobot = '../x.robot'\n", ["[entry] robot must be a path inside the package"]),
        (HEAD + "[entry]\nrobot = 'C:\\\\x.robot'\n", ["[entry] robot must be a path inside the package"]),
        ('name = "hello"\nversion = 1.0.0\n', ["not valid TOML", "line 2"]),
        ('name = "hello\n', ["not valid TOML", "line 1"]),
    ],
)
def test_every_mistake_is_one_line_naming_its_field(text: str, fragments: list[str]) -> None:
    message = error_of(text)
    for fragment in fragments:
        assert fragment in message, message


def test_name_and_version_rules_are_those_of_the_wire() -> None:
    assert check_name("Hello_world-2") == "Hello_world-2"
    assert check_version("2.0.0-rc.1+build_7") == "2.0.0-rc.1+build_7"
    with pytest.raises(BadRequest, match=r"^--version must be 1-64 letters"):
        check_version("1 0", what="--version")
    base = manifest('[entry]\npython = "a:b"\n')
    assert base.with_version("2.0").version == "2.0"
    with pytest.raises(BadRequest, match=r"^--version must start with a letter or digit"):
        base.with_version("+1")


def write(folder: Path, files: dict[str, str]) -> Path:
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    return folder


def load_error(folder: Path) -> str:
    with pytest.raises(BadRequest) as caught:
        load_manifest(folder)
    assert "\n" not in caught.value.message
    return caught.value.message


def test_loading_checks_that_the_entry_is_in_the_folder(tmp_path: Path) -> None:
    folder = write(tmp_path / "p", {"herder.toml": HEAD + '[entry]\npython = "hello:main"\n', "hello.py": ""})
    assert load_manifest(folder).entry.target == "hello:main"

    package = write(tmp_path / "pk", {"herder.toml": HEAD + '[entry]\npython = "pkg.mod:main"\n'})
    assert "pkg/mod.py or pkg/mod/__init__.py" in load_error(package)
    write(package, {"pkg/mod/__init__.py": ""})
    assert load_manifest(package).name == "hello"
    module = write(tmp_path / "pm", {"herder.toml": HEAD + '[entry]\npython = "pkg.mod:main"\n', "pkg/mod.py": ""})
    assert load_manifest(module).name == "hello"

    missing = write(tmp_path / "m", {"herder.toml": HEAD + '[entry]\npython = "hello:main"\n'})
    message = load_error(missing)
    assert "[entry] python names module 'hello'" in message and "hello.py or hello/__init__.py" in message
    assert message.startswith(str(missing / "herder.toml") + ": ")

    robot = write(tmp_path / "r", {"herder.toml": HEAD + '[entry]\nrobot = "suites"\n'})
    assert "[entry] robot names 'suites', which is not in" in load_error(robot)
    write(robot, {"suites/a.robot": "*** Tasks ***\n"})
    assert load_manifest(robot).entry.kind is EntryKind.ROBOT

    script = write(tmp_path / "c", {"herder.toml": HEAD + '[entry]\ncommand = ["./run.sh", "--fast"]\n'})
    assert "[entry] command runs './run.sh', which is not in" in load_error(script)
    write(script, {"run.sh": "echo hi\n"})
    assert load_manifest(script).entry.args == ["--fast"]
    # A program found on PATH cannot be checked here, and is not.
    bare = write(tmp_path / "b", {"herder.toml": HEAD + '[entry]\ncommand = "bash run.sh"\n'})
    assert load_manifest(bare).entry.target == "bash"


def test_a_folder_without_a_manifest_says_what_it_needs(tmp_path: Path) -> None:
    assert load_error(tmp_path) == (
        f"{tmp_path} has no herder.toml; a process folder needs one (see 'herder package publish --help')"
    )
    assert "does not exist" in load_error(tmp_path / "nowhere")
    file = write(tmp_path, {"file.txt": ""}) / "file.txt"
    assert "is not a folder" in load_error(file)


def test_a_manifest_with_a_byte_order_mark_or_not_utf8(tmp_path: Path) -> None:
    folder = tmp_path / "bom"
    folder.mkdir()
    (folder / "herder.toml").write_bytes(b"\xef\xbb\xbf" + (HEAD + '[entry]\ncommand = "run"\n').encode())
    assert load_manifest(folder).name == "hello"
    (folder / "herder.toml").write_bytes(b'name = "\xff"\n')
    assert "not UTF-8 text" in load_error(folder)
