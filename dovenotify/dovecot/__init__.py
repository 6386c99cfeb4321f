"""dovenotify.dovecot"""
