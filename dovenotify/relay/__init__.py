"""dovenotify.relay"""
