from oslo_config import cfg

from nvmeof_mp import config


def test_sample_config_is_in_sync():
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "etc", "nvmeof_mp.conf.sample")
    with open(path) as f:
        assert f.read() == config.sample_text()


def test_policy_from_conf_overrides(tmp_path):
    conf = cfg.ConfigOpts()
    path = tmp_path / "n.conf"
    path.write_text("[nvmeof_mp]\nctrl_loss_tmo = 30\nleg_fast_io_fail_tmo = 2\n")
    conf(["--config-file", str(path)])
    policy = config.policy_from_conf(conf)
    assert policy.ctrl_loss_tmo == 30 and policy.leg_fast_io_fail_tmo == 2
    assert policy.reconnect_delay == 2
    assert policy.controller_options(replica_leg=True)["fast_io_fail_tmo"] == 2
    assert "fast_io_fail_tmo" not in policy.controller_options(replica_leg=False)
