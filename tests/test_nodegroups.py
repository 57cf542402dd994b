"""Node groups: ClusterShell's group file formats, read unchanged, and label groups."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal.logic.nodegroups import Groups, GroupsError, GroupsFile, load
from shoal.logic.nodeset import NodeSetError

YAML = """\
local:
    compute: 'node[1-10]'
    gpu: node[9-10]
    cpu: '@compute!@gpu'
    login: [login1, login2]
    all: '@compute,@login'
racks:
    rack1: 'node[1-5]'
    rack2: 'node[6-10]'
    odd: '@rack1&node[1-10/2]'
"""


def test_groups_d_yaml(tmp_path: Path) -> None:
    (tmp_path / "cluster.yaml").write_text(YAML)
    g = load(tmp_path)
    assert str(g.parse("@cpu")) == "node[1-8]"
    assert str(g.parse("@login")) == "login[1-2]"
    assert str(g.parse("@racks:odd")) == "node[1,3,5]"  # @rack1 inside resolves in racks
    assert str(g.parse("@all!@compute")) == "login[1-2]"
    assert str(g.parse("@*")) == "login[1-2],node[1-10]"
    assert str(g.parse("@racks:rack[1-2]")) == "node[1-10]"
    assert str(g.parse("@gpu,@racks:rack1")) == "node[1-5,9-10]"
    assert g.names() == ["all", "compute", "cpu", "gpu", "login"]
    assert g.names("racks") == ["odd", "rack1", "rack2"]


def test_groups_conf_with_autodir_and_stock_sed_upcall(tmp_path: Path) -> None:
    """The stock groups.conf: [Main] default/autodir, and the local source's sed upcall over
    a flat file, which is read as that file (no command runs)."""
    (tmp_path / "groups.d").mkdir()
    (tmp_path / "groups.d" / "racks.yaml").write_text("racks:\n  r1: 'n[1-4]'\n")
    flat = tmp_path / "groups"
    flat.write_text("# comment\nweb: n[1-2]\ndb: n3 # trailing\n\nall: @web,@db\n")
    (tmp_path / "groups.conf").write_text(f"""\
[Main]
default: local
autodir: $CFGDIR/groups.d /nonexistent

[local]
map: sed -n 's/^$GROUP:\\(.*\\)/\\1/p' {flat}
list: sed -n 's/^\\([0-9A-Za-z_-]*\\):.*/\\1/p' {flat}
""")
    g = load(tmp_path / "groups.conf")
    assert g.default == "local"
    assert str(g.parse("@web")) == "n[1-2]"
    assert str(g.parse("@*")) == "n[1-3]"
    assert str(g.parse("@racks:r1!@db")) == "n[1-2,4]"


def test_flat_file(tmp_path: Path) -> None:
    f = tmp_path / "groups"
    f.write_text("web: w[1-3]\n")
    assert str(load(f).parse("@web")) == "w[1-3]"


def test_labels() -> None:
    labels = {"n1": {"role": "web", "group": "gpu,rack1"}, "n2": {"role": "db"},
              "n3": {"group": "rack1"}}
    g = Groups().with_labels(labels)
    assert str(g.parse("@role=web,@role=db")) == "n[1-2]"
    assert str(g.parse("@rack1")) == "n[1,3]"
    assert str(g.parse("@rack1!@gpu")) == "n3"
    assert str(g.parse("@*")) == "n[1-3]"
    assert g.names() == ["gpu", "rack1"]


@pytest.mark.parametrize(("text", "fragment"), [
    ("@nope", "unknown group @nope"),
    ("@other:x", "unknown group source 'other'"),
    ("@loop", "nests deeper"),
    ("@bad!", "missing node set operand"),
    ("@a b", "invalid group"),
])
def test_resolution_errors(tmp_path: Path, text: str, fragment: str) -> None:
    (tmp_path / "g.yaml").write_text("local:\n  loop: '@loop2'\n  loop2: '@loop'\n")
    with pytest.raises(NodeSetError, match=fragment):
        load(tmp_path / "g.yaml").parse(text)


@pytest.mark.parametrize(("name", "content", "fragment"), [
    ("g.yaml", "local: [1, 2]", "must map group names"),
    ("g.yaml", "local:\n  a: {b: c}", "must be node set text"),
    ("g.yaml", "- a\n- b", "expected 'source"),
    ("g.yaml", "local:\n  'bad name': x", "bad group name"),
    ("g.yaml", "local: [", "not valid YAML"),
    ("groups", "no colon here", "expected 'name: nodeset'"),
    ("groups.conf", "[Main\n", "not a valid groups.conf"),
])
def test_bad_files_are_clear_errors(tmp_path: Path, name: str, content: str,
                                    fragment: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(GroupsError, match=fragment):
        load(tmp_path / name)


def test_missing_file_and_reload(tmp_path: Path) -> None:
    with pytest.raises(GroupsError, match="does not exist"):
        load(tmp_path / "nope.yaml")
    f = tmp_path / "g.yaml"
    f.write_text("local:\n  a: n1\n")
    cache = GroupsFile(str(f))
    assert str(cache.get().parse("@a")) == "n1"
    f.write_text("local:\n  a: n[1-22]\n")  # another size: seen without a restart
    assert str(cache.get().parse("@a")) == "n[1-22]"
