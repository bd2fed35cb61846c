"""Who may do what on a team server: principals, tokens and roles (see :mod:`.rbac`)."""
