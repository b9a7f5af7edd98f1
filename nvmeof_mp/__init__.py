"""nvmeof_mp: NVMe-oF connector with multipathing."""
