"""A round at the node: the site policy, participation (check, train, share, seal), candidate
audits and release acceptance."""
