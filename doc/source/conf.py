project = "nvmeof_mp"
copyright = "nvmeof_mp developers"
extensions = []
master_doc = "index"
html_theme = "alabaster"
exclude_patterns = []
