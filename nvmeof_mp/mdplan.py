"""Which returning legs join a running md RAID1: a pure decision from the legs' superblocks.

md's event count counts superblock updates, not writes: a leg that ran alone (and took
writes) can come back with a lower count than the running array and md re-adds it, resyncing
only what the running array's bitmap knows about over the leg's own writes.  The superblocks
say more: each leg records, when it last wrote its superblock, which roles of the array were
active ("Array State" of ``mdadm --examine``: ``AA``, ``A.``, ``.A``).  A returning leg whose
recorded view marks a member of the running array missing ran without that member: split
history, left out.  A leg whose view still shows every running member active merely stopped
hearing from the array: behind, re-added (the bitmap resyncs what it missed).

Inputs are ``md_examine`` results: dicts with ``MD_UUID``, ``MD_EVENTS``,
``MD_DEVICE_ROLE`` (a role number, or "spare", "faulty" ...) and ``MD_ARRAY_STATE``.
"""

from __future__ import annotations


def role(info):
    """The leg's active role number in its own superblock, or None."""
    value = (info or {}).get("MD_DEVICE_ROLE", "")
    return int(value) if value.isdigit() else None


def events(info):
    try:
        return int((info or {}).get("MD_EVENTS", -1))
    except ValueError:
        return -1


def view(info):
    """The roles the leg believed active when it last wrote its superblock, or None."""
    state = (info or {}).get("MD_ARRAY_STATE")
    if not state or any(c not in "AR.?" for c in state):
        return None
    return {i for i, c in enumerate(state) if c in "AR"}


def split_history(returning, running):
    """Why the ``returning`` leg must not be re-added into the array whose members'
    superblocks are ``running`` ({device: examine}), or None when it is merely behind."""
    seen = view(returning)
    if seen is None:
        return ("its superblock records no array state: whether it ran without the running "
                "array cannot be told, not re-added")
    if not running:
        return "no running member to judge it against, not re-added"
    mine = (returning or {}).get("MD_ARRAY_STATE")
    for device, info in sorted(running.items()):
        r = role(info)
        if r is None:
            return ("the running member %s records no active role: cannot judge, not "
                    "re-added" % device)
        if r not in seen:
            return ("split history: its superblock (array state %s) marks role %d, the "
                    "running member %s (array state %s), missing: it ran without that member "
                    "and may hold writes the array lacks, not re-added" % (
                        mine, r, device, info.get("MD_ARRAY_STATE")))
    top = max(events(info) for info in running.values())
    if events(returning) > top:
        return ("its event count %d is ahead of the running array's %d: it may hold writes "
                "the array lacks, not re-added" % (events(returning), top))
    return None


def returning_legs(members, running, returning):
    """Plan the re-adds after an assemble.  ``members``: legs the running array holds;
    ``running``: their examine results; ``returning``: {leg: examine} of the other legs
    (examined before the assemble).  Returns (re_add, left_out=[(leg, why)])."""
    re_add, left_out = [], []
    for leg, info in returning.items():
        if leg in members:
            continue
        why = split_history(info, running)
        if why:
            left_out.append((leg, why))
        else:
            re_add.append(leg)
    return re_add, left_out


def assemble_from(legs):
    """The legs to assemble a stopped array from ({leg: examine}): the freshest (highest
    event count) and those that did not run without it; a leg with a split history against
    it is kept out of the assemble and judged as a returning leg afterwards."""
    if not legs:
        return []
    base = max(sorted(legs), key=lambda d: events(legs[d]))
    return [d for d in sorted(legs)
            if d == base or split_history(legs[d], {base: legs[base]}) is None]
