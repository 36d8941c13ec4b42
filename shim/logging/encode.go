package logging

import (
	"fmt"
	"strconv"
	"unicode/utf8"
)

// badKey is the key of a value without one, as in log/slog.
const badKey = "!BADKEY"

// appendPairs appends the key-value pairs of attrs and then kv with appendPair.
func appendPairs(b []byte, attrs, kv []any, appendPair func([]byte, string, any) []byte) []byte {
	for _, list := range [][]any{attrs, kv} {
		for i := 0; i < len(list); i++ {
			key, ok := list[i].(string)
			if !ok || i+1 == len(list) {
				b = appendPair(b, badKey, list[i])
				continue
			}
			b = appendPair(b, key, list[i+1])
			i++
		}
	}
	return b
}

func appendJSONPair(b []byte, key string, v any) []byte {
	b = append(b, ',')
	b = appendJSONString(b, key)
	b = append(b, ':')
	switch v := v.(type) {
	case nil:
		return append(b, "null"...)
	case bool:
		return strconv.AppendBool(b, v)
	case int:
		return strconv.AppendInt(b, int64(v), 10)
	case int32:
		return strconv.AppendInt(b, int64(v), 10)
	case int64:
		return strconv.AppendInt(b, v, 10)
	case uint16:
		return strconv.AppendUint(b, uint64(v), 10)
	case uint32:
		return strconv.AppendUint(b, uint64(v), 10)
	case uint64:
		return strconv.AppendUint(b, v, 10)
	case float64:
		if v != v || v > 1e308 || v < -1e308 { // NaN and infinities are not JSON numbers
			return appendJSONString(b, strconv.FormatFloat(v, 'g', -1, 64))
		}
		return strconv.AppendFloat(b, v, 'g', -1, 64)
	}
	return appendJSONString(b, stringOf(v))
}

func appendTextPair(b []byte, key string, v any) []byte {
	b = append(b, ' ')
	b = appendTextValue(b, key)
	b = append(b, '=')
	if v == nil {
		return append(b, "<nil>"...)
	}
	return appendTextValue(b, stringOf(v))
}

// stringOf is how a value reads in a record: errors by their message, durations as "1.5s".
func stringOf(v any) string {
	switch v := v.(type) {
	case string:
		return v
	case error:
		return v.Error()
	case fmt.Stringer: // time.Duration among them: "1.5s"
		return v.String()
	}
	return fmt.Sprint(v)
}

// appendTextValue quotes s when it would not read back as one value, as slog's text does.
func appendTextValue(b []byte, s string) []byte {
	if s == "" {
		return append(b, `""`...)
	}
	for _, r := range s {
		if r == ' ' || r == '=' || r == '"' || r == utf8.RuneError || !strconv.IsPrint(r) {
			return strconv.AppendQuote(b, s)
		}
	}
	return append(b, s...)
}

const hex = "0123456789abcdef"

// appendJSONString appends s as a JSON string; invalid UTF-8 becomes U+FFFD.
func appendJSONString(b []byte, s string) []byte {
	b = append(b, '"')
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			switch {
			case c == '"' || c == '\\':
				b = append(b, '\\', c)
			case c == '\n':
				b = append(b, '\\', 'n')
			case c == '\r':
				b = append(b, '\\', 'r')
			case c == '\t':
				b = append(b, '\\', 't')
			case c < 0x20 || c == 0x7f:
				b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
			default:
				b = append(b, c)
			}
			i++
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && size == 1:
			b = append(b, `\ufffd`...)
		case r == '\u2028' || r == '\u2029': // valid JSON, but not in JavaScript string literals
			b = append(b, `\u202`...)
			b = append(b, hex[r&0xf])
		default:
			b = append(b, s[i:i+size]...)
		}
		i += size
	}
	return append(b, '"')
}
