"""The re-add decision from plain superblock values (``mdadm --examine`` of each leg)."""

from nvmeof_mp import mdplan
from nvmeof_mp.privileged.storage import examine_roles

UUID = "6e766d65:6f666d70:0a0b0c0d:01020304"


def leg(role, state, events):
    return {"MD_UUID": UUID, "MD_NAME": "any:vol1", "MD_EVENTS": str(events),
            "MD_DEVICE_ROLE": str(role), "MD_ARRAY_STATE": state}


A_ALONE = leg(0, "A.", 40)          # the running array: A ran without B


def test_a_leg_that_ran_without_the_running_member_is_left_out_whatever_its_count():
    for events in (3, 40, 41):
        why = mdplan.split_history(leg(1, ".A", events), {"/dev/nvme0n1": A_ALONE})
        assert "split history" in why and ".A" in why and "A." in why and "role 0" in why


def test_a_leg_that_last_saw_every_running_member_active_is_merely_behind():
    assert mdplan.split_history(leg(1, "AA", 12), {"/dev/nvme0n1": A_ALONE}) is None


def test_a_leg_behind_by_view_but_ahead_by_count_is_still_left_out():
    assert "ahead" in mdplan.split_history(leg(1, "AA", 41), {"/dev/nvme0n1": A_ALONE})


def test_what_cannot_be_judged_is_left_out():
    no_state = dict(leg(1, "AA", 1), MD_ARRAY_STATE="")
    assert "no array state" in mdplan.split_history(no_state, {"/dev/nvme0n1": A_ALONE})
    assert "no running member" in mdplan.split_history(leg(1, "AA", 1), {})
    spare = dict(A_ALONE, MD_DEVICE_ROLE="spare")
    assert "no active role" in mdplan.split_history(leg(1, "AA", 1), {"/dev/nvme0n1": spare})


def test_returning_legs_re_adds_the_behind_and_leaves_out_the_split_ones():
    running = {"/dev/nvme0n1": leg(0, "A..", 50)}
    returning = {"/dev/nvme0n1": leg(0, "AAA", 10), "/dev/nvme1n1": leg(1, "AAA", 10),
                 "/dev/nvme2n1": leg(2, ".AA", 20)}
    re_add, left_out = mdplan.returning_legs(["/dev/nvme0n1"], running, returning)
    assert re_add == ["/dev/nvme1n1"]
    assert [d for d, _ in left_out] == ["/dev/nvme2n1"]


def test_a_stopped_array_is_assembled_from_the_freshest_leg_and_the_legs_behind_it():
    legs = {"/dev/nvme0n1": leg(0, "A.", 40), "/dev/nvme1n1": leg(1, ".A", 30)}
    assert mdplan.assemble_from(legs) == ["/dev/nvme0n1"]
    legs = {"/dev/nvme0n1": leg(0, "A.", 40), "/dev/nvme1n1": leg(1, "AA", 30)}
    assert mdplan.assemble_from(legs) == ["/dev/nvme0n1", "/dev/nvme1n1"]
    assert mdplan.assemble_from({}) == []


EXAMINE = """/dev/nvme1n1:
          Magic : a92b4efc
        Version : 1.2
    Feature Map : 0x1
     Array UUID : 6e766d65:6f666d70:0a0b0c0d:01020304
           Name : any:vol1
     Raid Level : raid1
   Raid Devices : 2
    Update Time : Thu Nov 26 10:00:00 2026
  Bad Block Log : 512 entries available at offset 16 sectors
       Checksum : 1234abcd - correct
         Events : 31

   Device Role : Active device 1
   Array State : .A ('A' == active, '.' == missing, 'R' == replacing)
"""


def test_examine_roles_reads_the_role_and_the_recorded_array_state():
    assert examine_roles(EXAMINE) == {"MD_DEVICE_ROLE": "1", "MD_ARRAY_STATE": ".A"}
    spare = EXAMINE.replace("Active device 1", "spare")
    assert examine_roles(spare)["MD_DEVICE_ROLE"] == "spare"
    assert examine_roles("MD_LEVEL=raid1\n") == {}
    assert examine_roles(EXAMINE.replace(".A (", ".A;rm (")) == {"MD_DEVICE_ROLE": "1"}
