"""dovenotify.apns"""
