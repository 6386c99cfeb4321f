"""dovenotify.cli"""
