"""The site's privacy: the epsilon ledger, membership-inference attacks and their statistics, the
site audit and its command."""
