"""Run ckptd's crash, fault, hostile-input, power-loss and load tests and write docs/RELIABILITY.md.

    .venv/bin/python tests/reliability.py              # the whole reliability suite, once
    .venv/bin/python tests/reliability.py --repeat 5   # five times over, to measure flakiness
    .venv/bin/python tests/reliability.py -- -k power  # extra arguments after -- go to pytest

Each run is ``pytest`` on the reliability test files with a JUnit XML report. Tests record, with
pytest's ``record_property``, how many runs they made (a power-loss sweep cuts power at every
storage call: one run per cut), how many snapshots were reported committed and checked, how many
of those were lost (missing, not verifying, or not loading bit-exact), and how many runs failed.
The report is one table row per scenario: which tests cover it and what was measured.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FILES = [
    "tests/test_crash.py",
    "tests/test_power_loss.py",
    "tests/test_corruption.py",
    "tests/test_hostile.py",
    "tests/test_load.py",
    "tests/test_streaming.py",
    "tests/test_socket_dir.py",
    "tests/test_hostile_files.py",
    "tests/test_liveness.py",
    "tests/test_bad_tensors.py",
    "tests/test_handoff_faults.py",
    "tests/test_layout_limits.py",
    "tests/test_operator_cli.py",
    "tests/test_lightning_expectations.py",
    "tests/test_doc_examples.py",
    "tests/test_service.py",
    "tests/test_hf_trainer_expectations.py",
    "tests/test_multirank.py",
    "tests/test_hostile_i12.py",
    "tests/test_hf_review.py",
    "tests/test_multirank_fsdp.py",
    "tests/test_multinode_local.py",
    "tests/test_multirank_noncontig.py",
    "tests/test_multirank_stall.py",
    "tests/test_multinode.py",
    "tests/test_multirank_users.py",
    "tests/test_review_i11.py",
    "tests/test_hostile_i11.py",
]


@dataclass(frozen=True)
class Scenario:
    name: str
    how: str  # how the fault is produced and what is checked
    tests: str  # regular expression over test node ids (file.py::name[param])


SCENARIOS = [
    Scenario(
        "Daemon SIGKILLed during a snapshot",
        "`faulty_daemon.py kill-at/kill-after` kills the daemon at each boundary of step 2 (temp "
        "mkdir, mid-shard, between shards, before fsync, before index/manifest, before the directory "
        "fsync, before/after the rename, before/after LATEST, during retention). Nothing partial "
        "is visible, step 1 loads bit-exact, LATEST and `ckptd.latest` verify, the handle fails "
        "in < 5 s with `daemon_died`, a restarted daemon sweeps and commits.",
        r"test_crash\.py::test_daemon_killed_during_commit",
    ),
    Scenario(
        "EIO at commit boundaries",
        "`faulty_daemon.py eio-at`: EIO from create, index write, manifest fsync, directory fsync, "
        "rename, and after the rename (run-directory fsync, LATEST). A failed snapshot leaves "
        "nothing published; a committed one is what readers see.",
        r"test_crash\.py::test_io_error",
    ),
    Scenario(
        "Trainer SIGKILLed after `snapshot()` returned",
        "20 trainers forked from one process, each SIGKILLed after a random 0.05-1 s against a "
        "slow daemon; every snapshot whose return was logged is committed, verifies and loads "
        "bit-exact.",
        r"test_crash\.py::test_trainers_killed",
    ),
    Scenario(
        "Power loss at every storage call (all unsynced data lost)",
        "In-process daemon on a `Storage` that tracks fsynced lengths and unsynced directory "
        "entries (LevelDB fault-injection style); power is cut before each storage call in turn, "
        "for sequential and overlapping snapshots; files are truncated to their synced length "
        "and unsynced creates/renames/removals undone.",
        r"test_power_loss\.py::test_power_cut_at_every_storage_call",
    ),
    Scenario(
        "Power loss, directories persisted independently",
        "As above, but each directory keeps or loses its unsynced entry changes on its own "
        "(random per cut; or only the run directory forgets, during retention).",
        r"test_power_loss\.py::test_power_cut_(where_each_directory|during_retention)",
    ),
    Scenario(
        "Power loss right after Committed",
        "Power cut the moment the k-th Committed reaches the client, with the next snapshot in "
        "flight: every Committed step survives, verifies and loads bit-exact.",
        r"test_power_loss\.py::test_power_cut_right_after_committed",
    ),
    Scenario(
        "Corrupted newest checkpoint",
        "Flipped byte, truncated shard, removed shard, tampered index, tampered manifest; also "
        "broken or missing LATEST, all steps corrupt, fallback disabled. `restore()` falls back "
        "with a warning, `restore(step=N)` raises `corrupt`, `ckptd verify RUN` reports it.",
        r"test_corruption\.py::",
    ),
    Scenario(
        "Malformed frames and protocol abuse",
        "Oversized length prefixes, unknown kinds, messages before hello, wrong version, deep "
        "JSON, half frames, clients that never read; hypothesis: 100 random byte strings, 100 "
        "random JSON messages, 100 mutated valid exchanges, each on a fresh connection.",
        r"test_hostile\.py::test_(oversized|max_length|malformed|messages_before|wrong_protocol"
        r"|half_frames|client_that_never|fuzz_|raw_snapshot)",
    ),
    Scenario(
        "Bad arenas and descriptors",
        "RegisterArena without a descriptor, with a regular file, pipe, socket, directory, "
        "write-only or unsealed memfd, wrong declared size, twice, 12 descriptors at once, "
        "stray descriptors on other frames, releases of unknown arenas.",
        r"test_hostile\.py::test_(register_arena|bad_arena|registering|too_many|stray|release"
        r"|arena_released)",
    ),
    Scenario(
        "Hostile snapshot requests",
        "Ranges outside the arena, gaps and overlaps, negative or huge shapes, unknown dtypes, "
        "run names with `..`, `/`, absolute paths, component names with `/`, extra files, "
        "aliases, steps too long for a file name, duplicate in-flight steps; each bad case sent "
        "inline and as a registered layout; unknown, foreign and forgotten layouts; layouts past "
        "the per-connection and daemon-wide tensor limits.",
        r"test_hostile\.py::test_(bad_snapshot|two_components|step_too_long|snapshot_of_a_step|layouts_are"
        r"|oldest_layouts|layout_tensors_are)",
    ),
    Scenario(
        "Symlinks planted under the root",
        "A run directory, step directories and LATEST as symlinks out of the root; symlinked "
        "leftovers at start-up. Nothing outside the root is written or swept.",
        r"test_hostile\.py::test_(symlinked|restart_does_not_sweep)",
    ),
    Scenario(
        "Streamed snapshot that stops mid-copy",
        "`stream=True` snapshots written while still being copied: the copy raises halfway "
        "(Abandon), the trainer exits halfway, a raw client abandons, disconnects or goes silent "
        "past `--stage-timeout`; nothing is visible, the temp directory is removed, the same "
        "step commits afterwards. Also: nothing commits before the watermark covers every shard, "
        "a watermark never moves back, frames about unknown snapshots are ignored, a negative one "
        "is refused.",
        r"test_streaming\.py::",
    ),
    Scenario(
        "Client scribbling on its arena during the write",
        "A broken client keeps modifying an arena while its snapshot is written: the daemon must "
        "not report Committed for files that do not match their manifest.",
        r"test_hostile\.py::test_arena_scribbled",
    ),
    Scenario(
        "Load: 4 trainers x 50 snapshots",
        "Four processes snapshot to one daemon at once: all commit and verify, comparable "
        "completion times, daemon RSS within its arenas plus 64 MiB and flat.",
        r"test_load\.py::test_four_trainers",
    ),
    Scenario(
        "Leaks over 100 cycles",
        "Client RSS, descriptors and memfd mappings, daemon RSS and descriptors flat over 100 "
        "snapshot cycles after warm-up.",
        r"test_load\.py::test_hundred_cycles",
    ),
    Scenario(
        "Another user made the socket directory",
        "A second real uid (setpriv) makes `/tmp/ckptd-<victim uid>` first: mode 1777 with "
        "`ckptd.sock.log` symlinked to a victim's file (or to a new path), a pre-made readable log, "
        "a listening socket of its own, or the directory as a symlink; also a socket in a sticky "
        "shared directory and a log that is a symlink, FIFO or hard link. The victim's autostart "
        "and `serve --detach` are refused with what is wrong and the fix; nothing is written "
        "through the link, nothing reaches the attacker's log or socket, no daemon runs.",
        r"test_socket_dir\.py::test_(attacker|default_dir_as|socket_in_a_sticky|log_that_is)",
    ),
    Scenario(
        "Fresh machine: no socket directory yet",
        "`examples/demo.py` run as a new uid with no `/tmp/ckptd-<uid>`, no CKPTD_* and no "
        "XDG_RUNTIME_DIR (as README runs it); a fresh XDG_RUNTIME_DIR; `serve --detach "
        "--log-file DIR/x.log` with DIR missing (the Slurm script). The directory is made 0700, "
        "the log 0600, the snapshots commit.",
        r"test_socket_dir\.py::test_(demo_on_a_fresh|fresh_xdg|detach_with_a_log)",
    ),
    Scenario(
        "Root deleted or replaced while the daemon runs",
        "`rm -rf` of the root mid-write (slow daemon), of an idle daemon's root, and deleted then "
        "made again with a second daemon started on it: the snapshot fails `root_gone` saying "
        "what happened (not 'older checkpoints are intact'), the first daemon exits 1 and its "
        "socket is removed; the second daemon commits alone.",
        r"test_socket_dir\.py::test_(root_deleted|a_replaced_root|idle_daemon_stops)",
    ),
    Scenario(
        "Empty run name",
        '`snapshot(run="")` is refused at once with the naming rule, not written to `default`.',
        r"test_socket_dir\.py::test_empty_run_name",
    ),
    Scenario(
        "Damaged shard header in the newest step",
        "A real daemon commits steps 1 and 2; a shard of step 2 gets a negative dimension, a zero "
        "dimension next to huge ones, float dimensions, 100,000-deep JSON or offsets past the "
        "file, and the manifest is resealed with its checksum. Readers run in a child process "
        "with a timeout: `verify` names the shard, `ckptd.load` raises `CorruptCheckpoint` (never "
        "a raw RuntimeError/RecursionError), `restore` falls back to step 1 bit-exact with a warning.",
        r"test_hostile_files\.py::test_damaged_shard_header",
    ),
    Scenario(
        "Manifest file names that leave the step directory",
        "Step 2's manifest (resealed) names a shard `../../outside/x` or an absolute path to a "
        "bit-identical copy, `/dev/zero`, `../../../etc/passwd` with its checksum, an absolute "
        "index, a name with NUL. The manifest is refused as not naming plain file names: `verify` "
        "and `ckptd verify` say so, `load` of the run and `restore` give step 1 bit-exact.",
        r"test_hostile_files\.py::test_manifest_file_names",
    ),
    Scenario(
        "Special files in a checkpoint (FIFOs, links to /dev/zero, huge files)",
        "`ckptd.json`, a shard or an index of step 2 replaced by a FIFO, a symlink to /dev/zero, a "
        "symlink to an identical regular copy, or a 2 GiB sparse file; `LATEST` as a FIFO or a link "
        "to /dev/zero. Every reader (`load`, `restore`, `verify`, `ckptd ls`, `ckptd verify`) runs "
        "bounded in a child: none hangs or runs out of memory, each names the file and what it is, "
        "`restore` falls back to step 1 bit-exact.",
        r"test_hostile_files\.py::test_special_",
    ),
    Scenario(
        "The daemon reads a hostile LATEST",
        "`LATEST` replaced by a FIFO, a link to /dev/zero or to /etc/passwd before steps 2 and 3 "
        "(with `--keep-last 2`): both commit within 20 s, `LATEST` becomes a regular file naming "
        "step 3, /etc/passwd is untouched, the daemon log warns, `restore` gives step 3 bit-exact.",
        r"test_hostile_files\.py::test_daemon_commits_past",
    ),
    Scenario(
        "Something other than a directory at a step path",
        "`step-000003` pre-made as a FIFO, a regular file, a symlink to a valid-looking copy "
        "outside the root, or a dangling symlink: snapshot step 3 fails with `commit_error` "
        'saying what is there and to remove it (not "already committed"); `committed_steps`, '
        "`ckptd ls`, `load` and `restore` ignore it and give step 2; nothing outside is touched.",
        r"test_hostile_files\.py::test_non_directory_at_a_step_path",
    ),
    Scenario(
        "Daemon stopped or its writes hung",
        "The daemon is SIGSTOPped with snapshots in flight: `wait()`, `snapshot(policy='block')` "
        "with every slot in flight, and `close()` each return within `liveness_timeout_s` + 3 s "
        "with `daemon_unresponsive` naming the pid; `connect` to it raises naming the socket. A "
        "`faulty_daemon.py hang-write` pwrite blocks: `daemon_stuck` naming the stage while "
        "heartbeats go on and other runs commit; a slow but progressing write is not failed.",
        r"test_liveness\.py::test_(wait_on|blocking|close_on|a_write_stuck|a_slow|connect_to|heartbeats)",
    ),
    Scenario(
        "Errors that say what happened",
        '`close(timeout_s=1)` on a stopped daemon fails the handle with `closed` ("may still '
        'commit", and it does after SIGCONT); a daemon refusing with `Failed` or closing during '
        "hello gives a `CheckpointError` naming the socket; an unobserved failure is raised by the "
        "next `snapshot()` after it has taken its snapshot (`err.handle` commits, bit-exact).",
        r"test_liveness\.py::test_(close_with|a_refused|an_unobserved)",
    ),
    Scenario(
        "Lost snapshots keep their slots; threads do not block each other",
        "Daemon SIGKILLed and restarted: later snapshots use other slots and `resubmit()` commits "
        "the lost step's own bytes; with every slot lost, `snapshot()` raises `lost_snapshots` for "
        "each policy until `discard_lost()`. `skip`/`error` from a second thread return in < 1 s "
        "while another thread's `snapshot()` waits for the only slot.",
        r"test_liveness\.py::test_(a_snapshot_lost|when_every_slot|skip_and_error)",
    ),
    Scenario(
        "Stopped daemon: sends bounded, lost slots not reused while still readable",
        "With the daemon SIGSTOPped, a `snapshot()` whose 30,000-tensor layout does not fit in the "
        "socket buffer fails `daemon_unresponsive` within `liveness_timeout_s` + 5 s (no send "
        "blocks the trainer or the watchdog) and the next one commits once resumed. A step handed "
        "over while stopped, its connection given up, is read by the resumed daemon slowly "
        "(`faulty_daemon.py slow-snapshot`) while the new connection is answered at once: "
        "`discard_lost()` plus a new step in the only slot wait until the old connection is read "
        "to its end, so step 1 commits its own bytes (not step 2's, under verifying checksums).",
        r"test_liveness\.py::test_(a_send_into|a_lost_slot_is_not|sends_stay_bounded)",
    ),
    Scenario(
        "Tensor larger than its storage",
        "A trainer subprocess snapshots a parameter whose storage FSDP-style `resize_(0)` freed, "
        "a 4 MiB view on 4 KiB of storage, a strided and an offset view past a shrunk storage, "
        "16 bytes on 8: `snapshot()` raises a ValueError naming the tensor, its shape, stride, "
        "offset and storage size (no segfault), nothing of that step is committed, the next "
        "step commits; a storage freed and restored between snapshots of one cached plan; views "
        "that read no bytes pass.",
        r"test_bad_tensors\.py::test_(tensor_larger|storage_shrunk|tensors_that_touch)",
    ),
    Scenario(
        "Sparse, quantized and unstorable dtypes",
        "COO/CSR/CSC/BSR/BSC tensors, quantized, complex, bit and sub-byte dtypes, F8_E8M0 and "
        "F4 are refused by `snapshot()` with what to snapshot instead; fp8 fnuz round-trips "
        "through `ckptd.load` and `safetensors.torch.load_file`.",
        r"test_bad_tensors\.py::test_(sparse|unsupported_dtype|fp8_fnuz|a_lazy_conjugate)",
    ),
    Scenario(
        "Reserved names",
        "Component `ckptd` and tensor names `''` and `__metadata__` are refused by `snapshot()`, "
        "before anything reaches the daemon.",
        r"test_bad_tensors\.py::test_reserved_names",
    ),
    Scenario(
        "Trainer SIGKILLed while the daemon has not read its snapshots",
        "The daemon is SIGSTOPped; a trainer takes three steps, each in a new slot (RegisterArena + "
        "descriptor before each Snapshot), all return, the trainer is SIGKILLed, the daemon "
        "resumed: every reply fails (EPIPE), yet every step is read, committed, verifies and loads "
        "bit-exact.",
        r"test_handoff_faults\.py::test_snapshots_returned_before_the_trainer_died_are_committed",
    ),
    Scenario(
        "Idle connections up to the connection limit",
        "`faulty_daemon.py connections:8:1`: 8 raw connections that never say hello; a real client "
        "gets `too_many_clients` (not a reset), the idle ones are closed with `Failed` after the "
        "hello timeout, then a real client connects and commits; clients that said hello count "
        "towards the limit too.",
        r"test_handoff_faults\.py::test_idle_connections",
    ),
    Scenario(
        "A 150,000-tensor layout registering while others snapshot",
        "One connection registers a 150,000-tensor layout (sent in parts, as the client does) while "
        "another client commits small snapshots and new clients connect: each round trip under "
        "a third of the registration time (unfixed: the whole of it); then a snapshot of the huge "
        "layout commits bit-exact.",
        r"test_handoff_faults\.py::test_(a_huge_layout|layout_parts_join|sliced_shard_headers|parts_that_do_not_join"
        r"|a_large_single_frame|unfinished_frames)",
    ),
    Scenario(
        "A huge sparse shard with a valid header",
        "Step 2's last shard is replaced by a sparse file whose header is valid (one F32 tensor of "
        "8 TiB, or of 1 GiB in a reader limited by RLIMIT_AS to 256 MiB more) and the manifest "
        "resealed for its size: `load` raises `CorruptCheckpoint` naming the shard and the size "
        "(never a raw RuntimeError or an OOM kill), `restore` falls back to step 1 bit-exact.",
        r"test_hostile_files\.py::test_huge_sparse_shard",
    ),
    Scenario(
        "A run directory under a name ckptd never gives a run",
        "A run directory copied to `weird name`, `-dash`, `a..b`: `ckptd.load` of it raises "
        "FileNotFoundError saying no checkpoint is there and how to load one (not InvalidName); its "
        "step directories load bit-exact; `ckptd.load('.')` in a run directory loads its newest step.",
        r"test_hostile_files\.py::test_load_of_(a_run_directory_whose|the_current_run)",
    ),
    Scenario(
        "EIO from a write while the root's mount glitches",
        "`faulty_daemon.py eio-glitch:2`: pwrite of step 2 fails with EIO and every stat of the root "
        "fails with EIO for 2 s: step 2 fails `io_error` EIO (not `root_gone`), the daemon keeps "
        "running through its idle root checks, step 3 commits.",
        r"test_socket_dir\.py::test_eio_while_the_root_glitches",
    ),
    Scenario(
        "Hostile layouts: empty shards, endless parts, many unfinished ones, huge frames",
        "Raw clients register 1000 empty shards (refused: a shard holds a tensor), parts past the "
        "layout limit in tensors, aliases or empty shards (the first part past it fails the layout, "
        "named in the Failed message), unfinished parts on two connections (a third layout gets "
        "layout_limit until one closes), and a 2 MiB layout frame (bad_frame before decoding: send "
        "it in parts); the planner makes no empty shard, held rows are untracked, nothing frozen.",
        r"test_layout_limits\.py::",
    ),
    Scenario(
        "A resealed manifest whose tree or step does not fit",
        "Step 2's manifest (resealed) holds optimizer state as a list, a module without its bias "
        "keys or with an extra key, an int for the model, or param groups of ints; or says step 1: "
        "`verify`/`load` report the step mismatch, `restore` falls back to step 1 bit-exact with a "
        "warning naming step 2, and with `fallback=False` raises `CheckpointError` "
        "(`restore_mismatch`) with the model and optimizer unchanged.",
        r"test_hostile_files\.py::test_(tree_that_does_not_fit|manifest_naming_another)",
    ),
    Scenario(
        "Hostile sizes: a 1 TiB sparse index, a shard padded past its header, a step over memory",
        "Step 2's index is truncated to 1 TiB (sparse), or a shard grows by 1 TiB past what its "
        "header describes, with the manifest resealed for the size: `verify`, `load` and `restore` "
        "refuse it within seconds by its size or header (never hashing it), restore falls back to "
        "step 1 bit-exact; a step whose shards each fit the (patched) memory bound but together do "
        "not: `load` raises `CheckpointTooLarge` naming the total, the bound and safe_open.",
        r"test_hostile_files\.py::test_(huge_sparse_index|shard_with_sparse_bytes|step_whose_shards)",
    ),
    Scenario(
        "Operator commands: stop, prune, rm, export, ls, verify",
        "The venv's `ckptd` script against real daemons: `stop` (found by $CKPTD_SOCKET) drains a "
        "slow (`slow:0.3`) 24 MiB snapshot, which loads bit-exact, and waits until the daemon has "
        "exited; `stop --now` exits at once, nothing committed, the temp directory swept at the next "
        "start; a `hang-write` drain makes `stop --timeout 2` fail naming the pid; `prune --keep-last` "
        "keeps the newest steps and LATEST's, never a temp directory; `rm` refuses LATEST's step "
        "(unless `--latest-too`, which moves LATEST back), a temp directory, a step without a manifest "
        "and a symlink; `export` of a tied GPT-2 (one shard and several) loads with `from_pretrained` "
        "bit-exact and still tied, and refuses a corrupt shard leaving nothing; `ls` defaults to "
        "$CKPTD_ROOT/./checkpoints, flags a LATEST that does not verify, prints no traceback into "
        "`head`; `verify ROOT` checks every run.",
        r"test_operator_cli\.py::test_(version|stop|prune|rm|export|ls|verify)",
    ),
    Scenario(
        "Status progress of a one-shard snapshot mid-write",
        "`slow:0.4` makes each 4 MiB chunk of one 24 MiB shard take 0.4 s: `ckptd status --watch` "
        "into a pipe shows bytes written strictly between 0 and the total, in whole chunks as they "
        "reach the file, a partial percentage in text mode, no terminal control codes, and "
        "`clients` 1 (the status command is not counted).",
        r"test_operator_cli\.py::test_status",
    ),
    Scenario(
        "Lightning: load_from_checkpoint and resuming an older step into the same run",
        "Real Lightning Trainers on the CPU with `CkptdCheckpointIO`: a pointer loads with "
        "`load_from_checkpoint(Module, path)` (no daemon; hyper-parameters, weights bit-identical); "
        "a training resumed from step 4 into a run that has steps up to 8 skips 6 and 8 with one "
        "warning, keeps them byte-identical and saves 10 and 12; the same for the HF Trainer.",
        r"test_lightning_expectations\.py::",
    ),
    Scenario(
        "Every documented example runs; a done callback does not hide a failure",
        "Each ```python block of README.md and docs/*.md runs in order in a fresh directory "
        "against its own daemon (README twice: the rerun resumes); a failed snapshot whose only "
        "callback read `h.path` is raised by the next `snapshot()` and by `close()`, one whose "
        "callback read `h.error` is not.",
        r"test_doc_examples\.py::",
    ),
    Scenario(
        "Metrics and /healthz: escaping, refusals, a wedged writer, a stalled loop",
        "Label values with quotes, backslashes and newlines parse back with prometheus_client's own "
        "parser; a real daemon exposes README's metric names, process metrics and build info; an "
        '"already committed" refusal counts in `ckptd_snapshots_refused_total`, not as an I/O '
        "failure; `/healthz` is 200 normally, 503 naming the writers while every writer's pwrite "
        "hangs, 503 naming the event loop while it is blocked (answered off the loop), then 200.",
        r"test_service\.py::test_(label_values|metrics_carry|already_committed|healthz)",
    ),
    Scenario(
        "Deployment files and dependencies as written",
        "The daemon and ckptd status/ls/verify run with torch unimportable (and -X importtime lists "
        "none); the Slurm script runs end to end with a stand-in srun (daemon, training, drain); the "
        "pod is not restarted after training and requests resources; the systemd unit's ckptd passes "
        "`systemd-analyze verify` after the documented install; every daemon dependency is imported; "
        "`parse_size` reads sizes as transformers' convert_file_size_to_int.",
        r"test_service\.py::test_(daemon|pod|systemd|sbatch|every_daemon|parse_size)",
    ),
    Scenario(
        "Small files as bytes: tokenizers through the daemon, binary and multi-MB, bounded",
        "A real Trainer with a tokenizer trained in the test: every file its save_pretrained writes "
        "is in the step directory byte for byte and `AutoTokenizer.from_pretrained(step_dir)` has "
        "the same vocabulary, encoding and chat template; a 3 MiB non-UTF-8 tokenizer.model and a "
        "9 MiB tokenizer.json land intact and verify; files over 40 MiB, or named like weights, "
        "pickles, ckptd.json or a path, are refused with the limit or rule in the message.",
        r"test_hf_trainer_expectations\.py::test_(tokenizer_files|small_files|snapshot_frame)",
    ),
    Scenario(
        "HF Trainer idioms: resume_from_checkpoint=True, save_total_limit, on_save, trainer_state.json",
        "A Trainer stopped after step 5 (ckptd step 3 committed) resumes in a new Trainer with "
        "`train(resume_from_checkpoint=True)` through the `checkpoint-3` link and ends bit-identical "
        "to an uninterrupted run; `save_total_limit=2` (and accelerate's `total_limit=2`, and a "
        "snapshot's `keep_last=2`) leave exactly two committed steps and their links; a recording "
        "callback's `on_save` runs once per committed step on the training thread with the link in "
        "place and `best_model_checkpoint` set; `TrainerState.load_from_json` reads the step's "
        "trainer_state.json, training_args.json is JSON and no pickle is written.",
        r"test_hf_trainer_expectations\.py::test_(resume_from|save_total|keep_last|accelerate_total|on_save|trainer_state)",
    ),
    Scenario(
        "DDP under torchrun: one checkpoint, each byte written once",
        "Real `torchrun` (gloo, CPU), 2 and 4 ranks, DDP on a tiny Qwen2, one daemon: one step "
        "directory, `from_pretrained` bit-exact to rank 0's model, `ckptd verify` passes, the "
        "manifest names which rank wrote each shard (as assigned), the parts' bytes sum to one "
        "copy; restore under the same ranks returns the step, bit-exact on every rank.",
        r"test_multirank\.py::test_ddp_step_is_one_checkpoint_written_once",
    ),
    Scenario(
        "Every trainer SIGKILLed after all ranks' snapshot() returned",
        "2 ranks, writes slowed 0.3 s each: every rank SIGKILLs itself after a barrier that follows "
        "its snapshot(); the step commits afterwards, verifies, LATEST moves, the daemon lives.",
        r"test_multirank\.py::test_every_trainer_killed",
    ),
    Scenario(
        "A rank that never hands over its part",
        "2 ranks, the last exits after connect instead of snapshotting: the survivor's handle fails "
        "`parts_missing` naming rank 1 within the commit timeout; nothing visible, LATEST unchanged, "
        "temp directory removed.",
        r"test_multirank\.py::test_rank_that_never_snapshots",
    ),
    Scenario(
        "EIO on one rank's part",
        "2 ranks, EIO on the write of a shard rank 1 owns: every rank's handle fails with the same "
        "error naming rank 1, EIO and the file; nothing visible, temp directory removed.",
        r"test_multirank\.py::test_failed_part_fails_every_rank",
    ),
    Scenario(
        "A Trainer callback writing into checkpoint-N",
        "real Trainer, an on_save callback saving an adapter into checkpoint-N: its files land in "
        "output_dir (a directory of links and a marker), the step verifies and holds none of them; "
        "committed files 0444 and directories 0555, so the step's owner (uid 65534) writing "
        "through a link gets PermissionError; prune, rm, retention, discard and sweep remove "
        "sealed steps as that user.",
        r"test_hf_review\.py::test_(on_save_files|committed_step_is_read_only|every_deletion_path)",
    ),
    Scenario(
        "Another training's checkpoint, another training's run",
        "real Trainer resumed from a stock checkpoint ends with its weights, not ckptd's; a second "
        "training gets its own default run (no skipped saves, no pruned steps of the first); one "
        "into a shared run stops with already_committed naming run, step and fix; --keep-last "
        "bounds a snapshot's keep_last; the best step survives save_total_limit.",
        r"test_hf_review\.py::test_(resume_from_a_foreign|second_training|daemon_keep_last|"
        r"retention_keeps_the_best|keep_steps_survive)",
    ),
    Scenario(
        "Tokenizer files on the wire",
        "a 9 MiB blob is base64-encoded once for two frames (identity cache), both decode to the same "
        "bytes; processor files with names ckptd refuses are left out with a warning.",
        r"test_hf_review\.py::test_(unchanged_blob|processor_files_ckptd)",
    ),
    Scenario(
        "Hostile: loader-named components, unanswering daemons, full stdout, export into a step, "
        "resume after death",
        "Components named `teacher.safetensors` / `model.safetensors` are refused (never a directory "
        "where loaders read weights); `ckptd stop` on a SIGSTOPped daemon and on another user's "
        "(setpriv uid 65534) says it did not take the command, within --timeout; `ckptd ls > "
        "/dev/full` prints one line, no traceback; `export` into the step directory is refused and "
        "the step unchanged; a trainer `os._exit`ed right after snapshot() returned: the step "
        "commits and `train(resume_from_checkpoint=True)` in a new process finds its checkpoint-N; "
        "save_total_limit=1 with metric_for_best_model trains to the end and keeps the best step; "
        "README's example reruns with fewer than 500 steps.",
        r"test_hostile_i12\.py::",
    ),
    Scenario(
        "FSDP2 under torchrun: slices written straight into consolidated files",
        "Real `torchrun` (gloo, CPU), 2 ranks, FSDP2 (`fully_shard`) tiny Qwen2 (513-row vocabulary) "
        "and a 3-row module, AdamW after one step: `from_pretrained(step_dir)` bit-exact to the "
        "state gathered with `full_tensor()`, `ckptd verify` passes, the parts' ranges add up to the "
        "unique bytes, both ranks wrote into the model's files; uneven dim-0 shards whole in "
        "`ckptd.load`; the pieces' tiling check names gaps and overlaps.",
        r"test_multirank_fsdp\.py::(test_fsdp_step_is_a_consolidated|test_uneven_dim0|test_tiling|"
        r"test_sharded_plan)",
    ),
    Scenario(
        "FSDP2 step restored at another world size",
        "The 2-rank step restored into fresh FSDP2 models + AdamW of 2 and 4 ranks and a plain "
        "one-process model: model and optimizer state bit-exact, the next two steps' losses equal to "
        "the uninterrupted run's; `dcp.load` with `HuggingFaceStorageReader(step_dir)` into a 2-rank "
        "FSDP2 model bit-exact.",
        r"test_multirank_fsdp\.py::(test_restore_at_any_world_size|test_dcp_load)",
    ),
    Scenario(
        "Partial DTensor placement refused; per-rank stall",
        "A `Partial` DTensor snapshotted under torchrun is refused naming the placement and what to "
        "do (redistribute, or full_tensor()); each rank's snapshot() time against copies "
        "of its local bytes and of the whole model is recorded.",
        r"test_multirank_fsdp\.py::(test_partial_placement|test_per_rank_stall)",
    ),
    Scenario(
        "FSDP2: every trainer SIGKILLed after all ranks' snapshot() returned",
        "2 FSDP2 ranks, every pwrite slowed 0.2 s: each rank SIGKILLs itself after a barrier that "
        "follows its snapshot(); the step commits afterwards from the daemon's copies, verifies, "
        "LATEST moves, both parts listed, the daemon lives.",
        r"test_multirank_fsdp\.py::test_every_trainer_killed",
    ),
    Scenario(
        "FSDP2: EIO on one rank's slice write into a consolidated file",
        "EIO on the first slice written into the first model file (its header written at staging): "
        "both ranks' handles fail with the same `io_error` naming the rank, EIO and the file; "
        "nothing visible, temp directory removed.",
        r"test_multirank_fsdp\.py::test_failed_slice_write",
    ),
    Scenario(
        "Several nodes, node-local roots: a copy per node, restore on a step every node has",
        "Two `torchrun --nnodes 2` launchers, 2 DDP ranks each, a daemon and root per node: every "
        "node's step is a complete checkpoint `from_pretrained` loads bit-exact, its manifest naming "
        "which of the node's ranks wrote each shard; node 1's trainers SIGKILLed before snapshot() "
        "of step 3: restore on every rank takes step 2 (bit-exact); `step=3` fails on every rank "
        "naming node n1; a flipped byte in node 1's step 2 falls back to step 1 with a warning; "
        "FSDP2 there is refused at snapshot() with the reason, nothing written.",
        r"test_multinode_local\.py::",
    ),
    Scenario(
        "Non-contiguous DTensors: per-rank files beside consolidated ones",
        "Real `torchrun` (gloo, CPU), 2 ranks: a tiny Qwen2 of `Shard(1)` parameters, a 2-D mesh's "
        "`(Replicate(), Shard(0))` and `(Shard(0), Shard(1))` ones, a `Shard(0)` module, AdamW: the "
        "manifest names each component's path (per-rank / consolidated), per-rank headers carry "
        "`DCP_SHARDING_INFO` with each block, a replicated block is written once, parts add up to the "
        "unique bytes, `ckptd.load` whole tensors; `Partial` refused; damaged blocks named.",
        r"test_multirank_noncontig\.py::(test_each_component|test_load_gives|test_partial|test_blocks_|"
        r"test_daemon_refuses)",
    ),
    Scenario(
        "Non-contiguous step restored at 1, 2, 4 ranks; dcp.load; ckptd export",
        "The 2-rank step restored into a plain process and into 2 and 4 ranks (a 2 x 2 mesh): state "
        "bit-exact, the next optimizer step equal to the uninterrupted run's; `dcp.load` with "
        "`HuggingFaceStorageReader` on the per-rank directory bit-exact; `ckptd export` writes a "
        "consolidated copy that `from_pretrained` loads bit-exact.",
        r"test_multirank_noncontig\.py::(test_restore_at_any_world_size|test_export)",
    ),
    Scenario(
        "FSDP2 snapshot() with every other rank SIGSTOPped",
        "2 and 4 ranks: the others SIGSTOP themselves; rank 0's snapshot() returns at once (no "
        "collective on its thread), the step commits once they wake; a second flatten computes no "
        "DTensor layout; stall vs a copy of the same local bytes recorded (bound: 5x).",
        r"test_multirank_stall\.py::test_snapshot_runs_no_collective",
    ),
    Scenario(
        "DTensors on a one-device mesh, and ranks' local shards on CUDA",
        "A world of one with a Shard(0) DTensor on a 1-device mesh: held whole, snapshot and "
        "restore bit-exact (CPU; CUDA with gpu); 2 ranks' from_local shards saved bit-exact, on CUDA "
        "through the pinned side-stream path with in-place updates queued after snapshot() returned.",
        r"test_multirank_stall\.py::test_(cuda_)?(dtensor_on_a_one|local_shards)",
    ),
    Scenario(
        "Two nodes, one shared root: DDP and FSDP2 steps committed once",
        "Two daemons (`--node-id n0`/`n1`) of one root, two `torchrun --nnodes 2` launchers on one "
        "host: a DDP step is one step directory, one commit by rank 0's daemon (the other learns it "
        "from the root), the manifest names which rank wrote what, `from_pretrained` and "
        "`restore()` bit-exact, nothing swept; an FSDP2 step is consolidated by both nodes' "
        "daemons, `from_pretrained` and a two-node `restore()` bit-exact.",
        r"test_multinode\.py::(test_ddp_two_nodes|test_fsdp_two_nodes)",
    ),
    Scenario(
        "Two nodes: a daemon SIGKILLed mid-save and restarted on one node",
        "Node 1's daemon (writes slowed) SIGKILLed while its part is written and started again on "
        "the same root and node id: it sweeps nothing of the step node 0 still holds, step 1 intact "
        "and LATEST unchanged, step 2 fails on both ranks (node 0's naming rank 1), step 3 commits; "
        "a daemon starting on a shared root keeps the other node's single-process, in-flight, "
        "one-daemon and leased temp directories and removes only its own, `.failed` and dead ones.",
        r"test_multinode\.py::(test_daemon_restarted|test_start_up_sweep)",
    ),
    Scenario(
        "Two nodes: kill matrix (trainers, daemons, SIGSTOP, ENOSPC)",
        "Every trainer SIGKILLed after all snapshot()s returned: committed; node 1's trainer "
        "SIGKILLed before its snapshot(): node 0's handle fails within the commit timeout naming "
        "rank 1, nothing visible, LATEST unchanged, temp data removed; node 1's daemon SIGKILLed "
        "mid-write: node 0's handle fails (no hang), nothing visible; rank 0's trainer SIGSTOPped "
        "during the commit: committed; ENOSPC on node 1: both ranks fail naming rank 1 and ENOSPC, "
        "nothing visible; rank 0's trainer SIGKILLed after its daemon accepted: committed.",
        r"test_multinode\.py::(test_every_trainer|test_node1_|test_trainer_stopped|test_enospc|"
        r"test_coordinators)",
    ),
    Scenario(
        "FSDP2 job of a user who is not root",
        "The daemon and both ranks run as uid 65534 (setpriv): the ranks' slices are written into "
        "consolidated files the daemon reopens for each part (owner-writable until every part is "
        "durable, then sealed 0444); the step commits and verifies. Before: EACCES for every user "
        "but root.",
        r"test_multirank_users\.py::",
    ),
    Scenario(
        "Multi-rank review (#11): topology, node files, per-rank steps in the HF Trainer output",
        "Real gloo ranks: 3 nodes of which 2 share a root refused on every rank (not taken for "
        "node-local roots), node-local and shared roots still told apart; a FIFO or a link among "
        "the node files does not hang connect; a per-rank `model` step (2 ranks, `Shard(1)`, real "
        "daemon) linked into `checkpoint-N/` without error and without per-rank files; its empty "
        "and uneven DTensors load with their shapes; node-local restore where one node lacks every "
        "step fails alike on every rank saying what to copy; a daemon of another node starting "
        "on a shared root keeps this node's in-flight step.",
        r"test_review_i11\.py::",
    ),
    Scenario(
        "Shared root, hostile: slow writers, prefix node ids, forged node files",
        "Real daemons, the other node's work laid out on disk: a step past its deadline whose part "
        "marker is fresh is left by a restarted daemon of another node (a dead one still goes); node "
        "`gpu`'s start-up sweep leaves node `gpu-1`'s single-process temp directory; a FIFO, a link "
        "to it and garbage JSON among `.ckptd-nodes/*.lock` neither hang the daemon's start nor "
        "the holders' read, which still names the live daemon; node 1's daemon SIGKILLed right "
        "after creating its part manifest (empty, marker beside it): rank 0 fails naming rank 1 "
        "within 45 s instead of waiting forever, nothing visible; a `.failed` name of node "
        "`a.failed.b` with no FAILED.json still reads rank 1, ENOSPC, that node; a live node's "
        "lock file of garbage JSON still makes the root shared for the sweep; node 1's daemon "
        "SIGSTOPped past the marker timeout, and rank 0's daemon SIGSTOPped mid-commit past its "
        "lease, then SIGCONTed: one decision (both ranks fail), nothing visible or left, LATEST "
        "stays, the next step commits.",
        r"test_hostile_i11\.py::",
    ),
]


@dataclass
class Result:
    nodeid: str
    outcome: str  # passed, failed, error, skipped
    seconds: float
    properties: dict[str, str] = field(default_factory=dict)
    message: str = ""

    def number(self, key: str, default: int) -> int:
        try:
            return int(self.properties[key])
        except (KeyError, ValueError):
            return default


def run_pytest(extra: Sequence[str], xml: Path) -> int:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        *FILES,
        "-q",
        "-p",
        "no:cacheprovider",
        "-o",
        "junit_family=xunit1",
        f"--junitxml={xml}",
        *extra,
    ]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=REPO)


def parse(xml: Path) -> list[Result]:
    results = []
    for case in ET.parse(xml).iter("testcase"):
        module = case.get("classname", "").replace(".", "/")
        nodeid = f"{module}.py::{case.get('name', '')}"
        outcome, message = "passed", ""
        for tag, name in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            el = case.find(tag)
            if el is not None:
                outcome = name
                text = (el.get("message") or el.text or "").strip()
                message = text.splitlines()[0][:300] if text else ""
                break
        props = {p.get("name", ""): p.get("value", "") for p in case.iter("property")}
        results.append(Result(nodeid, outcome, float(case.get("time", "0")), props, message))
    return results


@dataclass
class Row:
    scenario: Scenario
    tests: set[str] = field(default_factory=set)
    executions: int = 0
    runs: int = 0
    failures: int = 0
    committed: int = 0
    lost: int = 0
    skipped: int = 0
    seconds: float = 0.0
    failing: list[Result] = field(default_factory=list)


def aggregate(results: list[Result]) -> tuple[list[Row], list[Result]]:
    rows = [Row(s) for s in SCENARIOS]
    unmatched = []
    for r in results:
        row = next((row for row in rows if re.search(row.scenario.tests, r.nodeid)), None)
        if row is None:
            unmatched.append(r)
            continue
        row.tests.add(re.sub(r"\[.*\]$", "", r.nodeid.split("::", 1)[1]))
        row.seconds += r.seconds
        if r.outcome == "skipped":
            row.skipped += 1
            continue
        row.executions += 1
        row.runs += r.number("runs", 1)
        row.committed += r.number("committed", 0)
        row.lost += r.number("lost", 0)
        failures = r.number("failures", 0)
        if r.outcome in ("failed", "error"):
            failures = max(failures, 1)
            row.failing.append(r)
        row.failures += failures
    return rows, unmatched


def git_revision() -> str:
    try:
        rev = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True).strip()
        dirty = subprocess.call(["git", "diff", "--quiet", "HEAD", "--", "ckptd", "client"], cwd=REPO)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + (" (ckptd/ or client/ modified)" if dirty else "")


def render(rows: list[Row], results: list[Result], repeat: int, seconds: float, extra: Sequence[str]) -> str:
    total_runs = sum(r.runs for r in rows)
    total_fail = sum(r.failures for r in rows)
    total_committed = sum(r.committed for r in rows)
    total_lost = sum(r.lost for r in rows)
    lines = [
        "# ckptd reliability report",
        "",
        "Generated by `python tests/reliability.py` (do not edit by hand; rerun it). It runs the crash,",
        "fault-injection, power-loss, corruption, hostile-input and load tests against real daemons",
        "and real files, and counts what they measured.",
        "",
        f"- When: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}, revision {git_revision()}",
        f"- Machine: {platform.system()} {platform.release()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        f"- Suite: {', '.join(f'`{f}`' for f in FILES)}"
        + (f", pytest arguments `{' '.join(extra)}`" if extra else ""),
        f"- Repeats: {repeat}; test executions: {len(results)}; wall time {seconds:.0f} s",
        f"- Totals: {total_runs} runs, {total_fail} failed, {total_committed} committed snapshots "
        f"checked, **{total_lost} lost**",
        "",
        "A *run* is one fault scenario played out (one kill point, one power cut, one fuzz case",
        "counts once per test). *Committed checked* counts snapshots reported committed (or whose",
        "`snapshot()` had returned, for killed trainers) that were then checked on disk; *lost* are",
        "those missing, not verifying (`ckptd.verify`), or not loading bit-exact. *Failed* counts",
        "failing runs (a sweep reports how many of its cuts failed) or failing tests.",
        "",
        "| Scenario | How it is tested | Tests | Runs | Failed | Committed checked | Lost | Time |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        tests = "<br>".join(f"`{t}`" for t in sorted(row.tests)) or "(none ran)"
        committed = str(row.committed) if row.committed else "—"
        status = f"**{row.failures}**" if row.failures else "0"
        lines.append(
            f"| {row.scenario.name} | {row.scenario.how} | {tests} | {row.runs} | {status} | "
            f"{committed} | {row.lost} | {row.seconds:.0f} s |"
        )
    failing: dict[str, list[Result]] = {}
    for r in (r for row in rows for r in row.failing):
        failing.setdefault(r.nodeid, []).append(r)
    executions = {nodeid: sum(r.nodeid == nodeid for r in results) for nodeid in failing}
    lines += ["", "## Failures", ""]
    if not failing:
        lines.append("None.")
    for nodeid, bad in failing.items():
        lines.append(f"- `{nodeid}` (failed {len(bad)} of {executions[nodeid]}): {bad[0].message}")
    lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=1, help="run the suite this many times")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "RELIABILITY.md")
    parser.add_argument("pytest_args", nargs="*", help="after --: extra pytest arguments")
    args = parser.parse_args(argv)
    results: list[Result] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ckptd-rel-") as tmp:
        for i in range(args.repeat):
            xml = Path(tmp) / f"run-{i}.xml"
            run_pytest(args.pytest_args, xml)
            if not xml.exists():
                print(f"pytest wrote no report ({xml}); see its output above", file=sys.stderr)
                return 2
            results += parse(xml)
    rows, unmatched = aggregate(results)
    for r in unmatched:
        print(f"warning: {r.nodeid} matches no scenario; add it to SCENARIOS", file=sys.stderr)
    text = render(rows, results, args.repeat, time.monotonic() - started, args.pytest_args)
    args.output.write_text(text)
    print(f"wrote {args.output}")
    failed = sum(r.failures for r in rows) + sum(r.outcome in ("failed", "error") for r in unmatched)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
