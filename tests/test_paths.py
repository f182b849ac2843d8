"""Work folders of dead processes are dropped; folders whose name ends in no usable pid are left alone."""

from uniql.paths import drop_dead_process_folders


def test_folders_whose_pid_no_process_can_have_are_skipped_not_fatal(tmp_path):
    """Before: `...-staging-99999999999999999999` made os.kill raise OverflowError and `...-staging-²` made int()
    raise ValueError ('²'.isdigit() is True): the save that called this failed after a whole compression."""
    names = ["x-staging-99999999999999999999", "x-staging-²", "x-staging-abc"]
    for name in names:
        (tmp_path / name).mkdir()
    drop_dead_process_folders(tmp_path, "x-staging-*")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
