package optd

// SetPageSizes shrinks the page sizes of Sessions and History so that tests
// can make them follow several pages; restore puts the defaults back.
func SetPageSizes(sessions, history int) (restore func()) {
	s, h := sessionsPageSize, historyPageSize
	sessionsPageSize, historyPageSize = sessions, history
	return func() { sessionsPageSize, historyPageSize = s, h }
}
